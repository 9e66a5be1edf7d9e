"""All-to-all that runs while the caller computes: the communication of the paired (1F1B) schedule.

`AsyncAllToAll(x, output_splits, input_splits, group)` starts a variable-split
`all_to_all_single` of `x` and returns at once; `.wait()` gives the received rows when the caller
needs them. In between, the caller computes something else (another micro-batch's layer).

- CUDA: the collective is issued on a side stream (one per device, `comm_stream`) that first
  waits on an event recorded on the compute stream right after `x` was produced, so it neither
  waits for compute queued later nor runs before its input exists. `wait()` makes the compute
  stream wait on an event recorded after the collective; the host never blocks. Memory: `x` and
  the output were allocated on the compute stream and are used on the side stream, so both are
  marked with `record_stream(side)`: the caching allocator then does not hand their blocks to
  new tensors until the side stream's work that uses them has finished, even if the caller drops
  them first.
- CPU (gloo): the process group's asynchronous work handle (gloo runs the exchange on its own
  threads); the handle keeps `x` alive until `wait()`.

Every rank of `group` must start the same all-to-alls in the same order (the schedule is the
same on every rank), as for any collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_COMM_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def comm_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream all-to-alls run on, one per device (made on first use)."""
    device = torch.device(device)
    if device not in _COMM_STREAMS:
        _COMM_STREAMS[device] = torch.cuda.Stream(device=device)
    return _COMM_STREAMS[device]


class AsyncAllToAll:
    """A variable-split all_to_all_single of the rows of `x` in flight; `wait()` -> received rows."""

    def __init__(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
        x = x.detach().contiguous()
        self.out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        self._x, self._work, self._done = x, None, None
        if x.is_cuda:
            compute = torch.cuda.current_stream(x.device)
            side = comm_stream(x.device)
            side.wait_event(compute.record_event())    # x is ready: it was produced just before
            with torch.cuda.stream(side):
                dist.all_to_all_single(self.out, x, output_split_sizes=output_splits,
                                       input_split_sizes=input_splits, group=group)
                self._done = side.record_event()
            x.record_stream(side)
            self.out.record_stream(side)
        else:
            self._work = dist.all_to_all_single(self.out, x, output_split_sizes=output_splits,
                                                input_split_sizes=input_splits, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        elif self._done is not None:
            torch.cuda.current_stream(self.out.device).wait_event(self._done)
        self._x = self._work = self._done = None
        return self.out
