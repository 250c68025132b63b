"""The README's "Use it in your DiT" examples run as written.

The python code blocks of that section are executed in order in one namespace (later examples reuse
earlier names, as a reader would in one session); their own asserts check what the prose claims.
"""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your DiT"


def _section_code_blocks() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]  # up to the next top-level section
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


def test_section_has_the_promised_examples():
    code = "\n".join(_section_code_blocks())
    for needed in ("mk.BlockCausal", "mk.attention(", "mk.qk_norm_rope(", 'norm_scope="hidden"', "apply_magi_kernels(",
                   'fp8="channel"', "xdit.merge_out_lse("):
        assert needed in code, f"README example for {needed} is missing"


def test_examples_execute(capsys):
    namespace: dict = {"__name__": "readme_examples"}
    for i, block in enumerate(_section_code_blocks()):
        exec(compile(block, f"README.md[{SECTION} block {i}]", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "apply_magi_kernels(WanTransformer3DModel)" in printed and "fp8 recipe 'channel'" in printed
    assert namespace["video"].shape == namespace["latents"].shape
