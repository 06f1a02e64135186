"""torchvision/timm on CPU-only torch: the import fix works in every kind of process.

Each check runs in a fresh interpreter (the fix is process-global and import-order sensitive).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
CPU_BUILD = torch.version.cuda is None and torch.version.hip is None


def run_python(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


MAKE_MODEL = """
    import timm, torch
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    print("OK", tuple(out.shape))
"""


def test_plain_import_timm_in_fresh_process():
    """The .pth hook installed by launch/env.sh makes `import timm` work with no kdscale import."""
    result = run_python(MAKE_MODEL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK (2, 3)" in result.stdout


def test_import_kdscale_then_timm_in_fresh_process():
    result = run_python("import kdscale\n" + textwrap.dedent(MAKE_MODEL))
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(not CPU_BUILD, reason="the failure only exists on CPU-only torch builds")
def test_without_the_fix_torchvision_really_fails():
    """Guards against the fix becoming dead code: the failure it works around is real here."""
    result = run_python("""
        import sys, kdscale.compat as c
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, c._ApplyBeforeTorchvision)]
        import torchvision
    """)
    assert result.returncode != 0
    assert "torchvision::nms does not exist" in result.stderr


def test_fix_does_nothing_on_a_cuda_build():
    result = run_python("""
        import sys, torch, kdscale.compat as c
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, c._ApplyBeforeTorchvision)]
        torch.version.cuda = "12.8"   # pretend to be a CUDA build
        assert c.apply() is False
        assert not hasattr(torch.ops.torchvision, "nms")
        print("untouched")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "untouched" in result.stdout


@pytest.mark.skipif(not CPU_BUILD, reason="CPU-only torch")
def test_compiled_ops_raise_a_clear_error():
    result = run_python("""
        import torch, torchvision
        try:
            torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
        except RuntimeError as exc:
            print("clear:", "Couldn't load custom C++ ops" in str(exc))
    """)
    assert "clear: True" in result.stdout, result.stderr[-2000:]


def test_spawned_dataloader_workers_import_timm(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Models(Dataset):
            def __len__(self): return 4
            def __getitem__(self, i):
                import timm  # imported fresh inside a spawned worker
                return sum(p.numel() for p in timm.create_model("resnet10t", pretrained=False).parameters())

        if __name__ == "__main__":
            loader = DataLoader(Models(), batch_size=2, num_workers=2, multiprocessing_context="spawn")
            print("OK", [b.tolist() for b in loader])
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK")


@pytest.mark.distributed
def test_torchrun_children_import_timm(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, timm, torch.distributed as dist
        dist.init_process_group("gloo")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=2)
        print("rank", dist.get_rank(), "params", sum(p.numel() for p in model.parameters()))
        dist.barrier()
        dist.destroy_process_group()
    """))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(script)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 params" in result.stdout and "rank 1 params" in result.stdout
