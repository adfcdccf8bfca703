"""EMO's language-modelling experiment (docs/EMO_LM.md): every emo_lm_gpt2_* preset's loss on an imported tiny GPT-2
equals DRSY/EMO's GPT2MIXModel loss (an independent torch transcription below) on the same batch to 1e-5; the presets
resolve to the script's settings; `evaluate mauve --split words --decoding unbiased` cuts and decodes as the script."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from maxlm import convert, model, pretrained
from maxlm import losses as maxlm_losses
from maxlm.core.config import load_config
from maxlm.core.errors import DataError
from maxlm.evals import mauve as mauve_eval
from maxlm.state import step as step_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODES = ("mle", "mixce", "tvd", "emo", "adaptive_emo")
LENGTHS = (12, 9, 5)  # right-padded rows, as a padded batch reaches GPT2MIXModel.forward
PAD = 1


def mix_model_loss(lm, input_ids, attention_mask, mode, *, mixing_ratio=0.5, cost_embedding=None):
  """GPT2MIXModel.forward's loss (DRSY/EMO language_modeling/gpt2.py, reduction "mean"), transcribed from reading it:
  labels are the ids with -100 where the mask is 0; position t's logits score label t+1; a per-token objective over
  every position, averaged over the shifted mask with a 1e-15 guard. EMO compares the one-hot target, smoothed by
  adding 1e-15 to every entry and renormalising to sum 1, with the model's distribution, both mapped through the
  row-normalised cost embedding; adaptive EMO takes the live head and removes the target's own probability from the
  model side under no_grad."""
  return mix_loss_from_logits(lm(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids,
                              attention_mask, mode, head=lm.lm_head.weight, mixing_ratio=mixing_ratio,
                              cost_embedding=cost_embedding)


def mix_loss_from_logits(logits, input_ids, attention_mask, mode, *, head, mixing_ratio=0.5, cost_embedding=None):
  labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
  vocab = logits.shape[-1]
  z = logits[:, :-1].reshape(-1, vocab)
  y = labels[:, 1:].reshape(-1)
  m = attention_mask[:, 1:].reshape(-1).to(z.dtype)
  ce = torch.nn.functional.cross_entropy(z, y, ignore_index=-100, reduction="none")  # 0 where y = -100
  q = torch.exp(-ce).detach()
  r = mixing_ratio
  if mode == "mle":
    tok = ce
  elif mode == "mixce":
    tok = r * ce + (1 - r) * q * ce
  elif mode == "tvd":
    tok = r * ce + (1 - r) * torch.clamp(q / ((1 - r) + r * q), 0.2, 1.0) * ce
  else:
    target = torch.nn.functional.one_hot(torch.where(y == -100, torch.zeros_like(y), y), vocab).to(z.dtype)
    smoothed = (target + 1e-15) / (target + 1e-15).sum(-1, keepdim=True)
    emb = (head.detach() if mode == "adaptive_emo" else cost_embedding)
    emb = emb / emb.norm(dim=1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    if mode == "adaptive_emo":
      p = p - (p * target).detach()
    cost = 1 - ((smoothed @ emb) * (p @ emb)).sum(-1)
    tok = 0.5 * (ce + (ce / (cost + 1e-10)).detach() * cost)
  return (tok * m).sum() / (1e-15 + m.sum())


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A tiny random GPT-2 (transformers), its maxlm import, the import's params and a right-padded batch."""
  root = tmp_path_factory.mktemp("emo_lm")
  hf = helpers.hf_tiny("gpt2", root / "hf")
  convert.from_hf(str(root / "hf"), str(root / "run"), log=lambda *_: None)
  cfg, params, _ = pretrained.load_params(str(root / "run"))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.model.vocab_size, (len(LENGTHS), max(LENGTHS)))
  mask = (np.arange(max(LENGTHS))[None] < np.asarray(LENGTHS)[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, PAD)
  return root, hf, cfg, params, ids, mask


def maxlm_loss(cfg, params, ids, mask, preset):
  """The preset's training loss (state.step.output_loss, the trainer's path) on the batch: inputs the ids but the
  last, targets the ids after the first with ignore_index where the mask is 0."""
  p = load_config(preset)
  cfg = dataclasses.replace(cfg, loss=p.loss)
  graphdef = model.abstract_model(cfg.model)[0]
  jparams = jax.tree.map(jnp.asarray, params)
  targets = np.where(mask[:, 1:] == 1, ids[:, 1:], cfg.loss.ignore_index)
  batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(targets, jnp.int32)}
  cost = None
  if cfg.loss.objective == "emo" and cfg.loss.cost_embedding == "fixed":
    cost = model.head_weights(cfg.model, jparams).T  # the frozen provider's snapshot at import
  loss, metrics = step_lib.output_loss(cfg, graphdef, jparams, batch, objective=cfg.loss.objective,
                                       cost_embedding=cost, compute_dtype="float32", **step_lib.loss_kwargs(cfg))
  return float(loss), metrics, cfg, graphdef, jparams, batch, cost


@pytest.mark.parametrize("mode", MODES)
def test_preset_loss_equals_gpt2mixmodel(gpt2, mode):
  _, hf, cfg, params, ids, mask = gpt2
  cost = hf.lm_head.weight.detach().clone()  # run_lm.py: deepcopy of the loaded head
  with torch.no_grad():
    ref = float(mix_model_loss(hf, torch.tensor(ids), torch.tensor(mask), mode, cost_embedding=cost))
  ours, metrics, cfg2, graphdef, jparams, batch, cost_j = maxlm_loss(cfg, params, ids, mask, f"emo_lm_gpt2_{mode}")
  assert abs(ours - ref) < 1e-5, (mode, ours, ref)
  assert int(metrics["n_valid"]) == int(mask[:, 1:].sum())
  # The reference losses on maxlm's logits (no fused kernel) agree too.
  logits = model.bind(graphdef, jparams).logits(batch["inputs"], compute_dtype="float32")
  kwargs = step_lib.loss_kwargs(cfg2)
  if cfg2.loss.objective == "emo" and cost_j is None:
    cost_j = model.head_weights(cfg2.model, jparams).T
  ref_loss, _ = maxlm_losses.compute(cfg2.loss.objective, logits, batch["targets"], cost_embedding=cost_j, **kwargs)
  assert abs(float(ref_loss) - ref) < 1e-5, (mode, float(ref_loss), ref)
  # EMO mode 1 without clamp has the value of CE (0.5 * (CE + CE / cost * cost)): what tells the modes apart is the
  # gradient, so the gradients in the logits must agree too.
  # maxlm's logits are of ids[:, :-1]; the transcription takes logits of all ids and drops the last position itself.
  full = np.concatenate([np.asarray(logits), np.zeros_like(np.asarray(logits[:, :1]))], axis=1)
  z = torch.tensor(full, requires_grad=True)
  mix_loss_from_logits(z, torch.tensor(ids), torch.tensor(mask), mode, head=hf.lm_head.weight,
                       cost_embedding=cost).backward()
  ref_grad = z.grad.numpy()[:, :-1]  # the last position scores no label
  our_grad = np.asarray(jax.grad(lambda l: maxlm_losses.compute(cfg2.loss.objective, l, batch["targets"],
                                                                 cost_embedding=cost_j, **kwargs)[0])(logits))
  grad_diff = float(np.max(np.abs(our_grad - ref_grad)))
  assert grad_diff < 1e-6 * max(1.0, float(np.max(np.abs(ref_grad)))), (mode, grad_diff)
  if mode != "mle":  # the objectives differ from CE in their gradient
    ce_grad = np.asarray(jax.grad(lambda l: maxlm_losses.cross_entropy(l, batch["targets"])[0])(logits))
    assert float(np.max(np.abs(ce_grad - our_grad))) > 1e-4
  print(f"{mode}: maxlm {ours:.7f} GPT2MIXModel {ref:.7f} |diff| {abs(ours - ref):.2e} grad |diff| {grad_diff:.2e}")


def test_presets_hold_the_scripts_settings():
  for mode in MODES:
    for suffix in ("", "_demo"):
      c = load_config(f"emo_lm_gpt2_{mode}{suffix}")
      assert (c.optim.schedule, c.optim.warmup_steps, c.optim.min_lr_ratio, c.optim.weight_decay) == ("linear", 0, 0, 0)
      assert (c.optim.b2, c.optim.grad_clip, c.train.seed) == (0.999, 0.0, 42)
      if not suffix:
        assert (c.train.seq_len, c.train.global_batch, c.optim.lr) == (256, 32, 5e-5)
  assert load_config("emo_lm_gpt2_mixce").loss.ratio == 0.5
  emo = load_config("emo_lm_gpt2_emo").loss
  assert (emo.emo_mode, emo.emo_clamp, emo.emo_gt_trick, emo.cost_embedding) == (1, None, False, "fixed")
  ada = load_config("emo_lm_gpt2_adaptive_emo").loss
  assert (ada.emo_clamp, ada.emo_gt_trick, ada.cost_embedding) == (None, True, "adaptive")


def test_word_split_and_decoding_modes(tmp_path):
  words = [f"w{i}" for i in range(130)]
  docs = [" ".join(words), "== Heading == " + " ".join(words), " ".join(words[:100]), "short line",
          " ".join(reversed(words))]
  data = tmp_path / "held.txt"
  data.write_text("\n".join(docs) + "\n")
  prefixes, human, counts = mauve_eval.held_out_word_prefixes(str(data), prefix_words=20, continuation_words=80,
                                                              num_samples=0, log=lambda *_: None)
  assert counts == {"read": 5, "long_enough": 2, "used": 2}  # "==", < 110 words and < 100 characters are skipped
  assert prefixes[0] == " ".join(words[:20]) and human[0] == " ".join(words[20:100])
  assert mauve_eval.decoding_knobs("unbiased") == dict(temperature=1.0, top_k=0, top_p=1.0)
  assert mauve_eval.decoding_knobs("top_k")["top_k"] == 50
  with pytest.raises(DataError, match="--decoding unbiased"):
    mauve_eval.decoding_knobs("unbiased", top_p=0.9)
  with pytest.raises(DataError, match="no document"):
    mauve_eval.held_out_word_prefixes(str(data), prefix_words=200, continuation_words=80, num_samples=0,
                                      log=lambda *_: None)
