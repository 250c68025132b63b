"""``torchrun -m magi_model.generate`` on CPU with gloo: rank 0 writes the same mp4 frames as one process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.distributed._launch import REPO, free_port, worker_env

PROMPT = "a red fox running through snow"
ARGS = ["--preset", "tiny_random", "--mode", "t2v", "--no_progress"]
SEED = 1234


def _frames(path):
    import av  # a dependency of magi_model (the CLI writes mp4 with it)

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _generate(*argv):
    # one thread per process on both sides: the same matmul blocking, bitwise results
    subprocess.run([sys.executable, "-m", "magi_model.generate", *ARGS, *argv], cwd=REPO, env=worker_env(),
                   check=True, timeout=600, capture_output=True)


def _torchrun(n, *argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "magi_model.generate", *ARGS, *argv],
                          cwd=REPO, env=worker_env(), timeout=600, capture_output=True, text=True)


@pytest.fixture(scope="module")
def single_request_video(tmp_path_factory):
    """One process, one request: the video every parallel run below must reproduce."""
    path = tmp_path_factory.mktemp("single") / "single.mp4"
    _generate("--prompt", PROMPT, "--seed", str(SEED), "--output_path", str(path))
    return _frames(path)


def test_torchrun_cp2_writes_the_single_process_video(tmp_path, single_request_video):
    par = tmp_path / "cp2.mp4"
    r = _torchrun(2, "--prompt", PROMPT, "--seed", str(SEED), "--cp_size", "2", "--output_path", str(par))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("wrote 48 frames") == 1  # rank 0 alone writes and reports
    b = _frames(par)
    assert single_request_video.shape == b.shape == (48, 128, 128, 3)
    assert np.array_equal(single_request_video, b)


def test_torchrun_pp2_interleaves_requests_and_each_equals_its_single_run(tmp_path, single_request_video):
    """Two requests (the second with chunk-wise prompts) through two pipeline stages at once; each must
    equal a one-process run of that request alone."""
    chunkwise = ["a cat on a sofa", "a dog in the rain"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n# comments and blank lines are skipped\n{json.dumps(chunkwise)}\n")
    r = _torchrun(2, "--prompts_file", str(prompts), "--seed", str(SEED), "--pp_size", "2",
                  "--output_path", str(tmp_path / "pp2.mp4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 requests interleaved through 2 pipeline stages" in r.stderr
    assert r.stderr.count("wrote 48 frames") == 2  # rank 0 alone writes, one line per request
    assert not (tmp_path / "pp2.mp4").exists()
    second = tmp_path / "second.mp4"
    _generate(*[a for p in chunkwise for a in ("--prompt", p)], "--seed", str(SEED), "--output_path", str(second))
    got0, got1, want1 = _frames(tmp_path / "pp2_0.mp4"), _frames(tmp_path / "pp2_1.mp4"), _frames(second)
    assert got0.shape == got1.shape == (48, 128, 128, 3)
    assert np.array_equal(got0, single_request_video)
    assert np.array_equal(got1, want1)
    assert not np.array_equal(got0, got1)


def test_cp_size_without_torchrun_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "magi_model.generate", *ARGS, "--prompt", PROMPT, "--cp_size", "2",
                        "--output_path", str(tmp_path / "x.mp4")], cwd=REPO, env=worker_env(), timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "cp_size * pp_size: must equal the world size 1" in r.stderr


@pytest.mark.parametrize("text, message", [
    ("\n# only a comment\n", "holds no prompt"),
    ('["a cat", \n', "line 1 starts with '[' but is not a JSON list"),
    ('["a cat", ""]\n', "line 1 must be a non-empty JSON list of non-empty strings"),
])
def test_bad_prompts_file_is_a_clear_error(tmp_path, text, message):
    from magi_model.generate import CLIError, read_prompts_file

    f = tmp_path / "p.txt"
    f.write_text(text)
    with pytest.raises(CLIError, match="prompts_file: .*" + message.replace("[", r"\[")):
        read_prompts_file(str(f))
