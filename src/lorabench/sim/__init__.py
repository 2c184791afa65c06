"""The memory simulator: symbolic tensors whose lifetimes follow PyTorch's, bytes only.

Modules, each importing only those before it:
  tensors     dtypes, byte categories, Storage, SymTensor, Edge, Node, Param, Checkpoint
  peaks       the recorded local maxima as candidate peak lines A + B·b
  live_bytes  LiveBytes: storages' lifetimes, live bytes per category, block windows
  rules       backward rules: what each node's backward allocates
  autograd    Graph(LiveBytes): recording nodes and saved tensors, checkpointed forward
  backward    Backward(Graph): PyTorch's backward engine, checkpoint recompute
  autocast    WeightCasts: autocast's weight-cast cache
  engine      Sim(Backward): the simulator the replays run on
  ops         generic ops on a Sim: linear, elementwise, binary, mul_const

The lowest layer above spec/ and base/: nothing here imports from the rest of lorabench.
"""
