"""train/prefetch.py: one batch ahead, yet the same batches, epochs and resume states as without it."""
from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from abvid.train.prefetch import DeviceFeed

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class Clips(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((2, 3), float(i)), "key": f"c{i}"}


def loader() -> StatefulDataLoader:
    # shuffle draws from the global torch RNG at iter(): the order depends on when each pass starts
    return StatefulDataLoader(Clips(), batch_size=3, shuffle=True, drop_last=True, num_workers=0)


def _run(prefetch: bool, steps: int) -> list[tuple]:
    torch.manual_seed(0)
    feed = DeviceFeed(loader(), torch.device("cpu"), on_device=lambda b: {**b, "y": b["x"] * 2}, prefetch=prefetch)
    feed.start()
    out = []
    for _ in range(steps):
        batch, epoch = feed.next()
        torch.rand(1)                                   # the step uses the RNG between batches
        out.append((tuple(batch["key"]), epoch, torch.equal(batch["y"], batch["x"] * 2), feed.loader_state()))
    return out


def test_lookahead_changes_nothing_the_loop_sees():
    plain, ahead = _run(False, 7), _run(True, 7)       # 2 batches per pass: three epoch boundaries
    assert [r[:3] for r in ahead] == [r[:3] for r in plain]
    assert [r[1] for r in plain] == [0, 0, 1, 1, 2, 2, 3] and all(r[2] for r in plain)
    checked = 0
    for k, (_, _, _, state) in enumerate(ahead[:-1]):   # each state resumes at the batch after it
        if plain[k + 1][1] != plain[k][1]:              # the pass ended there: resuming starts the next one
            continue
        again = loader()
        again.load_state_dict(state)
        assert tuple(next(iter(again))["key"]) == plain[k + 1][0], k
        checked += 1
    assert checked == 3


def test_empty_loader_is_an_error():
    feed = DeviceFeed(StatefulDataLoader([], batch_size=1), torch.device("cpu"), prefetch=True)
    feed.start()
    with pytest.raises(RuntimeError, match="no batch in a whole pass"):
        feed.next()


@pytest.mark.gpu
def test_side_stream_batches_arrive_intact():
    dev = torch.device("cuda", 0)
    src = StatefulDataLoader(Clips(), batch_size=3, shuffle=False, num_workers=0, pin_memory=True)
    feed = DeviceFeed(src, dev, on_device=lambda b: {**b, "y": b["x"] * 2})
    assert feed.prefetch
    feed.start()
    for i in range(2):
        batch, _ = feed.next()
        torch.cuda.current_stream(dev).synchronize()
        assert batch["x"].is_cuda and torch.equal(batch["y"].cpu(), batch["x"].cpu() * 2)
        assert batch["x"][0, 0, 0].item() == 3 * i
