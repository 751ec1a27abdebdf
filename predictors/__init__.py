"""Expert-path predictors (torch/numpy only; never imports moe_engine).

The ExpertPredictor protocol and the built-in predictors land with the predictor issue; the
package exists now so the installed layout is stable.
"""
