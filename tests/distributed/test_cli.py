"""``torchrun -m magi_model.generate`` on CPU with gloo: rank 0 writes the same mp4 frames as one process."""

import subprocess
import sys

import numpy as np

from tests.distributed._launch import REPO, free_port, worker_env

ARGS = ["--preset", "tiny", "--mode", "t2v", "--prompt", "a red fox running through snow", "--no_progress"]


def _frames(path):
    import av  # a dependency of magi_model (the CLI writes mp4 with it)

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_torchrun_cp2_writes_the_single_process_video(tmp_path):
    env = worker_env()  # one thread per process on both sides: the same matmul blocking, bitwise results
    single, par = tmp_path / "single.mp4", tmp_path / "cp2.mp4"
    subprocess.run([sys.executable, "-m", "magi_model.generate", *ARGS, "--output_path", str(single)], cwd=REPO,
                   env=env, check=True, timeout=600, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), "-m", "magi_model.generate", *ARGS,
                        "--cp_size", "2", "--output_path", str(par)], cwd=REPO, env=env, timeout=600,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("wrote 48 frames") == 1  # rank 0 alone writes and reports
    a, b = _frames(single), _frames(par)
    assert a.shape == b.shape == (48, 128, 128, 3)
    assert np.array_equal(a, b)


def test_cp_size_without_torchrun_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "magi_model.generate", *ARGS, "--cp_size", "2", "--output_path",
                        str(tmp_path / "x.mp4")], cwd=REPO, env=worker_env(), timeout=300, capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "cp_size * pp_size: must equal the world size 1" in r.stderr
