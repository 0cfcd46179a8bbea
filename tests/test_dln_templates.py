"""DLN templates render exactly the fixed prompt formats the zoo is trained on."""
from __future__ import annotations

import pytest

from dln_ens.dln.templates import TemplateError, TemplateLibrary, load_template

P, X, H, Y = "Decide the answer.", "Take 2 steps.\nOptions:\n- Yes\n- No", "two steps away", "No"


def test_fixed_formats_render_exactly():
    lib = TemplateLibrary("v1")
    assert lib.get("classify_forward").render(prompt=P, input=X) == f"{P}\n\nInput: {X}\nAnswer:"
    assert lib.get("classify_residual").render(prompt=P, input=X, h=H) == \
        f"{P}\n\nInput: {X}\nYour thoughts were: {H}\nAnswer:"
    assert lib.get("suffix_forward_tbs").render(prompt=P, input=X) == \
        f"{P}\n\nInput: {X}\nLet's think step by step."
    assert lib.get("suffix_forward_tbs_y").render(prompt=P, input=X, target=Y) == \
        f"{P}\n\nInput: {X}\nCorrect answer: {Y}\nLet's think step by step."
    assert lib.get("suffix_forward_tbs").stop == ("\n",)


def test_backward_template_lists_successes_errors_and_message():
    tpl = load_template("q_action_prompt:v1")
    assert tpl.message_alternatives[0] == ("Clarify the instruction by adding few words or a short "
                                           "sentence. Be concise.")
    infos = [dict(input="in-ok", target="t-ok", output="t-ok", wrong=False),
             dict(input="in-bad", target="t-bad", output="o-bad", wrong=True)]
    text = tpl.render(prompt="OLD PROMPT", backward_infos=infos, message="MSG")
    succ, err = text.index("# Student successes"), text.index("# Student errors")
    assert "> OLD PROMPT" in text and text.endswith("MSG\n## Instruction\n>")
    assert succ < text.index("in-ok") < err < text.index("in-bad")
    assert "## Student Output:\n> o-bad" in text and "o-bad" not in text[:err]


def test_versions_user_folder_and_errors(tmp_path):
    (tmp_path / "classify_forward.yaml").write_text(
        'v2:\n  stop: ["\\n"]\n  template: "Q: {{ input }}\\nA ({{ prompt }}):"\n')
    (tmp_path / "my_layer.yaml").write_text('v1:\n  template: "{{ prompt }} | {{ input }}"\n')
    lib = TemplateLibrary("v1", tmp_path)
    assert lib.get("classify_forward:v2").render(prompt="p", input="x") == "Q: x\nA (p):"
    assert lib.get("classify_forward").render(prompt="p", input="x") == "p\n\nInput: x\nAnswer:"
    assert lib.get("my_layer").render(prompt="p", input="x") == "p | x"
    assert TemplateLibrary("v2", tmp_path).get("classify_forward").version == "v2"
    with pytest.raises(TemplateError, match="no version 'v9'"):
        lib.get("classify_forward:v9")
    with pytest.raises(TemplateError, match="unknown template"):
        lib.get("nope")
    with pytest.raises(TemplateError, match="'h' is undefined"):
        lib.get("classify_residual").render(prompt="p", input="x")
    (tmp_path / "suffix_forward.yaml").write_text('v1:\n  template: "x"\n')
    with pytest.raises(TemplateError, match="already defined"):
        TemplateLibrary("v1", tmp_path)
    with pytest.raises(TemplateError, match="not a directory"):
        TemplateLibrary("v1", tmp_path / "missing")
