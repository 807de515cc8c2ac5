"""A rank's training state, named: operators and their optimizer state.

* :mod:`.operators`: the model split into checkpointable operators (embedding, each layer's
  dense part and router, each expert, output) with their compute weights;
* :mod:`.optim_view`: where each parameter's FP32 main copy and Adam moments live, for every
  Megatron-Core optimizer (plain, mixed precision, distributed, chained);
* :mod:`.fp8`: what an FP8 compute weight and a TE module's FP8 scaling state consist of;
* :mod:`.rng`: the rank's generator states; :mod:`.support`: the options the strategy refuses.
"""
