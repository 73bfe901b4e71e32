"""Two processes on 127.0.0.1 with gloo: DistributedDataParallel keeps the
bound C++ model's weights identical across ranks."""
import socket
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import vlmkit
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(1234 + rank)  # different initial weights: DDP must broadcast rank 0's
    model = vlmkit.TwoLeg(
        image_encoder={"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "num_heads": 4},
        text_encoder={"vocab_size": 64, "max_len": 16, "d_model": 32, "depth": 1, "num_heads": 4},
        fusion={"type": "cross_attention", "dim": 32}, head={"num_classes": 3})
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)  # each rank sees its own shard
    for _ in range(3):
        images, ids = torch.rand(4, 3, 32, 32, generator=g), torch.randint(1, 64, (4, 6), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        loss = ddp(images, ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), out)
    dist.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_keep_weights_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, str(outs[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
    a, b = (torch.load(o) for o in outs)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
