"""Looking at routing: traces, bounds, replays, the profiler and the offloading simulator.

    trace.py, record.py   the routing-trace format; recording one through a routing observer (`moe-engine trace`)
    belady.py, replay.py, lrc.py   Belady's minimum, replays through the engine's own policies, moe-lrc metrics
    profile.py, report.py, plot.py `moe-engine profile`: run + collect, rich tables, the figure
    simulate.py, hardware.py, shapes.py, sim_report.py   `moe-engine simulate`: the engine's CacheController over
                                   a modelled link and timeline
    synthetic.py   routing for simulate without a trace of the model: synthetic, another model's folded, the
                                   bundled model's own (tiny-moe-trace.npz)
    train.py       `moe-engine train-predictor`: fit the learned / path predictor on a trace
"""
