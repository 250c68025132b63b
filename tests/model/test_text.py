"""Text conditioning (docs/magi1.md#text-conditioning): special tokens, per-chunk captions, embedding sources."""

import numpy as np
import pytest
import torch

from magi_model import text as T

L, CC = 12, 6


def tokens():
    other = torch.arange(100, dtype=torch.float32)[:, None].expand(100, CC).clone() + 1000
    return T._named_tokens(torch.full((1, CC), -1.0), torch.full((1, CC), -2.0), other)


def prompt(v, n):
    e = torch.zeros(L, CC)
    e[:n] = v
    m = torch.zeros(L)
    m[:n] = 1
    return e, m


NULL, NULL_MASK = torch.full((L, CC), 0.5), (torch.arange(L) < 4).float()


def test_special_tokens_order_duration_and_prefix_chunks():
    flags = T.special_token_flags({})  # MAGI-1's run.sh defaults: PAD_HQ=1, PAD_DURATION=1
    assert flags["PAD_HQ"] and flags["PAD_DURATION"] and not flags["PAD_STATIC"]
    caps = T.build_captions([prompt(7.0, 3)], num_chunks=4, chunk_offset=1, null=NULL, null_mask=NULL_MASK,
                            special_tokens=tokens(), flags=flags)
    # Prefix chunk: null embedding, all-zero mask.
    assert torch.equal(caps.cond[0], NULL) and caps.cond_mask[0].sum() == 0
    # Noisy chunk i of 3: [DURATION_{3-i}, HQ, prompt...]; DURATION_k is other[6 + k], HQ other[1].
    for i, c in enumerate(range(1, 4)):
        assert caps.cond[c, 0, 0] == 1000 + 6 + (3 - i)
        assert caps.cond[c, 1, 0] == 1000 + 1
        assert (caps.cond[c, 2:5] == 7).all() and (caps.cond[c, 5:] == 0).all()
        assert caps.cond_mask[c].tolist() == [1] * 5 + [0] * (L - 5)
    assert torch.equal(caps.null[2], NULL) and torch.equal(caps.null_mask[3], NULL_MASK)


def test_duration_caps_at_8_and_truncation_to_length():
    caps = T.build_captions([prompt(1.0, L)], num_chunks=10, chunk_offset=0, null=NULL, null_mask=NULL_MASK,
                            special_tokens=tokens(), flags={"PAD_DURATION": True})
    assert caps.cond[0, 0, 0] == 1000 + 14 and caps.cond[9, 0, 0] == 1000 + 7  # DURATION_8 .. DURATION_1
    assert caps.cond_mask[0].sum() == L  # the prompt's last token fell off


def test_neg_prompt_tokens_on_null_branch():
    caps = T.build_captions([prompt(1.0, 2)], num_chunks=1, chunk_offset=0, null=NULL, null_mask=NULL_MASK,
                            special_tokens=tokens(), flags={"NEG_PROMPT": True})
    assert caps.null[0, :4, 0].tolist() == [1004, 1000, -2, -1]  # BORDERNESS, TRANS, LOGO, CAPTION
    assert torch.equal(caps.null_mask[0], NULL_MASK)


def test_chunkwise_prompts():
    caps = T.build_captions([prompt(1.0, 2), prompt(2.0, 3)], num_chunks=3, chunk_offset=0, null=NULL,
                            null_mask=NULL_MASK, flags={})
    assert caps.cond[0, 0, 0] == 1 and caps.cond[1, 0, 0] == 2 and caps.cond[2, 0, 0] == 2  # last one continues
    with pytest.raises(T.TextError, match="got 3 chunk-wise prompts but the video has only 2 generated chunk"):
        T.build_captions([prompt(1.0, 2)] * 3, num_chunks=3, chunk_offset=1, null=NULL, null_mask=NULL_MASK)
    with pytest.raises(T.TextError, match=r"prompt 0: embeddings must be \(12, 6\)"):
        T.build_captions([(torch.zeros(5, CC), torch.zeros(5))], num_chunks=1, chunk_offset=0, null=NULL,
                         null_mask=NULL_MASK)


def test_special_tokens_npz_fp16_rounding(tmp_path):
    rng = np.random.default_rng(0)
    arrs = {"caption_token": rng.normal(size=(1, CC)), "logo_token": rng.normal(size=(1, CC)),
            "other_tokens": rng.normal(size=(100, CC)) * 0.1234567}
    np.savez(tmp_path / "special_tokens.npz", **arrs)
    tok = T.load_special_tokens(str(tmp_path / "special_tokens.npz"))
    want = torch.from_numpy(arrs["other_tokens"][1].astype(np.float16).astype(np.float32))
    assert torch.equal(tok["HQ"], want) and tok["HQ"].dtype == torch.float32
    assert torch.equal(tok["DURATION_1"], torch.from_numpy(arrs["other_tokens"][7].astype(np.float16)).float())
    with pytest.raises(T.TextError, match="does not exist .*SPECIAL_TOKEN_PATH"):
        T.load_special_tokens(str(tmp_path / "nope.npz"))


def test_random_encoder_is_deterministic_and_masked():
    enc = T.RandomTextEncoder(CC, L, seed=1)
    e1, m1 = enc("A red  ball, bouncing")
    e2, _ = T.RandomTextEncoder(CC, L, seed=1)("a red ball, bouncing")
    assert torch.equal(e1, e2) and m1.tolist() == [1] * 5 + [0] * (L - 5)  # 4 words + end token
    assert torch.equal(e1[1], enc("red")[0][0])  # per-word vectors
    assert (e1[5:] == 0).all()


def test_precomputed_embeddings(tmp_path):
    from safetensors.torch import save_file

    save_file({"embeddings": torch.ones(2, 5, CC), "mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0.]])},
              str(tmp_path / "e.safetensors"))
    got = T.load_text_embeddings(str(tmp_path / "e.safetensors"), dim=CC, max_length=L)
    assert len(got) == 2 and got[1][0].shape == (L, CC) and got[1][1].tolist() == [1, 1, 1] + [0] * (L - 3)
    torch.save(torch.ones(5, 3), tmp_path / "bad.pt")
    with pytest.raises(T.TextError, match=r"'embeddings' must be \(P, L, 6\)"):
        T.load_text_embeddings(str(tmp_path / "bad.pt"), dim=CC, max_length=L)


def test_t5_needs_a_local_folder(tmp_path):
    with pytest.raises(T.TextError, match="must be a local folder with t5-v1_1-xxl/config.json"):
        T.T5TextEncoder(str(tmp_path))


def test_clean_caption():
    got = T.clean_caption("Hello%20World <b>bold</b> see https://x.com/a @bob \u201cq\u201d")
    assert got == 'hello world bold see "q"'
