"""Untrusted inputs: pickle checkpoints need "allow_pickle", a damaged checkpoint is named,
templates cannot run code (issue 11)."""
import shutil

import jinja2
import pytest

from dln_ens.config import ConfigError, parse_config
from dln_ens.dln.templates import TemplateError, TemplateLibrary
from dln_ens.lm.checkpoint import BrokenCheckpointError, UnsafeCheckpointError
from dln_ens.lm.hf import HFLanguageModel


@pytest.fixture(scope="module")
def pickle_dir(tiny_gpt2_dir, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("pickled")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(out)
    model.config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")   # what an old checkpoint holds
    return out


def test_pickle_only_checkpoint_needs_allow_pickle(pickle_dir):
    conf = {"name": "t", "backends": {"m": {"type": "hf", "path": str(pickle_dir)}}}
    with pytest.raises(ConfigError, match=r"key 'backends.m.path'.*only pickle weights \(pytorch_model.bin\).*"
                                          r"\"allow_pickle\": true"):
        parse_config(conf, source="c.json")
    with pytest.raises(UnsafeCheckpointError, match="only pickle weights"):
        HFLanguageModel.from_pretrained(pickle_dir)
    conf["backends"]["m"]["allow_pickle"] = True
    parse_config(conf)
    lm = HFLanguageModel.from_pretrained(pickle_dir, allow_pickle=True)
    assert lm.generate(["Input: yes"], max_new_tokens=2)[0].num_tokens >= 1


def test_truncated_safetensors_names_the_file(tiny_gpt2_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BrokenCheckpointError, match=r"broken/model.safetensors: cannot be read .*damaged or "
                                                    r"incomplete.*save the checkpoint again"):
        HFLanguageModel.from_pretrained(broken)


PAYLOAD = "{{ cycler.__init__.__globals__.os.system('touch ' ~ target) }}{{ prompt }}"


def test_template_cannot_run_commands(tmp_path):
    target = tmp_path / "pwned"
    # the payload is real: an ordinary Jinja2 environment runs the command
    jinja2.Environment().from_string(PAYLOAD).render(target=str(target), prompt="")
    assert target.exists()
    target.unlink()
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "evil.yaml").write_text("v1:\n  template: \"" + PAYLOAD.replace('"', '\\"') + "\"\n")
    tpl = TemplateLibrary("v1", folder).get("evil")
    with pytest.raises(TemplateError, match=r"evil:v1 .*tried an unsafe operation"):
        tpl.render(prompt="p", target=str(target))
    assert not target.exists()
