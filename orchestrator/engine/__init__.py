"""The pruning engine: model structure (blocks), device placement, the one block step, the local
engine (gradient pass + block-sequential pass) and sweeps. Torch only: no Ray, no DeepSpeed."""
