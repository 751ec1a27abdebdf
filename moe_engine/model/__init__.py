"""The decoder every family maps onto; imports torch only.

    decoder.py     embed -> [norm -> attention -> norm -> MoE | dense MLP] x L -> norm -> lm_head
    attention.py, mla.py, rope.py, linear.py, spec.py     attention (GQA, sinks, latent), rotary, kernels' seam
    moe.py         the MoE block's stages, chosen at build: select (routing.py) -> observers -> experts
    expert_compute.py   ExpertLoop / FusedExperts: dispatch -> source.fetch -> compute -> combine
    experts.py     the seams the block defines: ExpertSource (fetch -> LayerFetch) and RoutingObserver
                   (Observers: the stack the decoder reports each step's routing to); the packed expert layout
"""
