"""Linear probes of downstream tasks (Liuhong99/implicitbiasmlmcode run_lp.py; docs/IMPLICIT_BIAS.md): validation
accuracy of a linear classifier on a checkpoint's frozen features, or of the whole model fine-tuned with a
classification head, on a CSV `text,label` task (e.g. pcfg-tasks). Its CLI subcommand is `probe`.

Rows: each text tokenized with the checkpoint's tokenizer, truncated or right-padded to one fixed length (--seq-len,
default the longest training text, at most max_positions).
linear: features = the final hidden states (after the final norm) of all positions concatenated, (T * hidden), with
  pad positions set to 0 so a row carries only its own tokens' states; standardised with the training rows' mean and
  std (a constant dimension keeps std 1); softmax regression with an L2 penalty (weight_decay / 2 * |W|^2, bias free)
  trained by Adam, full-batch (--batch-size 0) or shuffled minibatches; zero init, so the result is deterministic.
finetune: a head (hidden, classes) on the hidden state of each row's last real token (a causal model has read the
  whole text there, as LlamaForSequenceClassification pools), trained together with every model weight by AdamW.
A bidirectional checkpoint (a masked LM, model.causal=false) is read as an encoder: every position sees the whole
  text, and the padding is a segment of its own, so it changes no real token's state.
majority_baseline: the share of validation rows whose label is the most frequent training label.
"""

from __future__ import annotations

import collections
import csv
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxlm import model_text
from maxlm import model as model_lib
from maxlm import pretrained
from maxlm.analysis.common import analysis_config, report
from maxlm.core.errors import ConfigError, DataError, cli_description

MODES = ("linear", "finetune")
FEATURE_BATCH = 32  # rows per forward pass when extracting features


# ----------------------------------------------------------------------------- data


def read_task(path: str) -> tuple[list[str], list[str]]:
  """(texts, labels) of a CSV with `text` and `label` columns (pcfg-tasks' format)."""
  if not os.path.isfile(path):
    raise DataError(f"task file {path!r} does not exist; write one with `python -m maxlm.data pcfg-tasks`")
  with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM would rename the first column
    reader = csv.DictReader(f)
    missing = {"text", "label"} - set(reader.fieldnames or ())
    if missing:
      raise DataError(f"{path} has columns {reader.fieldnames}; a task CSV needs a header with 'text' and 'label'")
    rows = [(r["text"], r["label"]) for r in reader]
  bad = [i for i, (t, l) in enumerate(rows) if t is None or l is None or l == ""]
  if bad:
    raise DataError(f"{path}: row {bad[0] + 2} has no text or no label")
  if not rows:
    raise DataError(f"{path} holds a header but no rows")
  return [t for t, _ in rows], [l for _, l in rows]


def encode(codec: model_text.TextCodec, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(ids (N, T) right-padded with the pad id, mask (N, T), rows truncated)."""
  encoded = codec.encode_batch(texts)
  ids = np.full((len(texts), seq_len), codec.pad_id, np.int32)
  mask = np.zeros((len(texts), seq_len), np.int32)
  for i, tokens in enumerate(encoded):
    tokens = tokens[:seq_len]
    ids[i, :len(tokens)] = tokens
    mask[i, :len(tokens)] = 1
  empty = np.flatnonzero(mask.sum(1) == 0)
  if len(empty):
    raise DataError(f"text {empty[0]} tokenizes to zero tokens; every row needs at least one")
  return ids, mask, sum(len(t) > seq_len for t in encoded)


def majority_baseline(train_labels: np.ndarray, val_labels: np.ndarray) -> float:
  top = collections.Counter(train_labels.tolist()).most_common(1)[0][0]
  return float(np.mean(val_labels == top))


# ----------------------------------------------------------------------------- linear probe


def hidden_features(cfg, params: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(N, T * hidden) fp32: final hidden states of all positions, pads zeroed, concatenated in position order."""
  graphdef = model_lib.abstract_model(cfg.model)[0]
  bidirectional = not cfg.model.causal

  @jax.jit
  def forward(params, tokens, mask):
    # A bidirectional encoder's real tokens would read the padding after them: it is its own segment.
    segments = mask.astype(jnp.int32) if bidirectional else None
    hidden = model_lib.bind(graphdef, params)(tokens, segment_ids_BxT=segments, compute_dtype=jnp.float32)
    return (hidden * mask[..., None]).reshape(tokens.shape[0], -1)

  out = []
  for start in range(0, len(ids), FEATURE_BATCH):
    chunk, m = ids[start:start + FEATURE_BATCH], mask[start:start + FEATURE_BATCH]
    pad = FEATURE_BATCH - len(chunk)  # one shape, one compile
    feats = forward(params, np.pad(chunk, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0))).astype(np.float32))
    out.append(np.asarray(feats)[:len(chunk)])
  return np.concatenate(out)


def standardise(train_x: np.ndarray, *others: np.ndarray):
  mean, std = train_x.mean(0), train_x.std(0)
  std = np.where(std > 1e-6, std, 1.0)
  return [(x - mean) / std for x in (train_x,) + others]


def train_linear(x: np.ndarray, y: np.ndarray, classes: int, *, steps: int = 500, lr: float = 1e-2,
                 weight_decay: float = 1e-3, batch_size: int = 0, seed: int = 0) -> dict:
  """Softmax regression {"w" (F, C), "b" (C,)} by Adam on mean CE + weight_decay / 2 * |w|^2."""
  params = {"w": jnp.zeros((x.shape[1], classes), jnp.float32), "b": jnp.zeros((classes,), jnp.float32)}
  tx = optax.adam(lr)

  def loss(p, xb, yb):
    logits = xb @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean() + 0.5 * weight_decay * jnp.sum(
        jnp.square(p["w"]))

  @jax.jit
  def step(p, opt, xb, yb):
    grads = jax.grad(loss)(p, xb, yb)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt

  opt = tx.init(params)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  for xb, yb in _batches(x, y, steps=steps, batch_size=batch_size, seed=seed):
    params, opt = step(params, opt, xb, yb)
  return params


def _batches(x, y, *, steps: int, batch_size: int, seed: int):
  """`steps` batches: the whole set each time (batch_size 0 or >= N), else seeded shuffled epochs dropping the
  remainder (one shape, one compile)."""
  n = len(y)
  if not batch_size or batch_size >= n:
    for _ in range(steps):
      yield x, y
    return
  rng = np.random.default_rng(seed)
  done = 0
  while True:
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      if done == steps:
        return
      rows = order[start:start + batch_size]
      yield x[rows], y[rows]
      done += 1


def predict_linear(params: dict, x: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.argmax(jnp.asarray(x, jnp.float32) @ params["w"] + params["b"], axis=-1))


# ----------------------------------------------------------------------------- fine-tuning


def finetune(cfg, params: dict, data: dict, classes: int, *, steps: int = 300, lr: float = 1e-4,
             weight_decay: float = 0.0, batch_size: int = 32, seed: int = 0, progress: bool = True):
  """(trained {"model", "head"}, predict(ids, mask) -> labels): every weight plus a classification head on the last
  real token's hidden state, AdamW on the mean CE; a progress bar on stderr over the steps unless `progress` is
  False."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  graphdef = model_lib.abstract_model(cfg.model)[0]
  hidden = cfg.model.hidden
  head = jax.random.normal(jax.random.key(seed), (hidden, classes), jnp.float32) * hidden ** -0.5
  state = {"model": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), "head": head}
  tx = optax.adamw(lr, weight_decay=weight_decay)

  segments = (lambda mask: mask.astype(jnp.int32)) if not cfg.model.causal else (lambda mask: None)

  def logits_fn(p, tokens, mask):
    h = model_lib.bind(graphdef, p["model"])(tokens, segment_ids_BxT=segments(mask), compute_dtype=jnp.float32)
    last = jnp.maximum(mask.sum(1) - 1, 0)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0] @ p["head"]

  def loss(p, tokens, mask, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, tokens, mask), labels).mean()

  @jax.jit
  def step(p, opt, tokens, mask, labels):
    grads = jax.grad(loss)(p, tokens, mask, labels)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt

  opt = tx.init(state)
  ids, mask, labels = data["ids"], data["mask"], data["labels"]
  index = np.arange(len(labels))
  with tqdm(total=steps, desc="finetune probe", unit="step", disable=not progress, dynamic_ncols=True) as bar:
    for rows, _ in _batches(index, index, steps=steps, batch_size=batch_size, seed=seed):
      state, opt = step(state, opt, ids[rows], mask[rows], labels[rows])
      jax.block_until_ready(opt)  # the bar counts finished steps, not dispatched ones
      bar.update(1)
  logits_jit = jax.jit(logits_fn)

  def predict(ids, mask):
    out = [np.asarray(jnp.argmax(logits_jit(state, ids[s:s + FEATURE_BATCH], mask[s:s + FEATURE_BATCH]), -1))
           for s in range(0, len(ids), FEATURE_BATCH)]
    return np.concatenate(out)

  return state, predict


# ----------------------------------------------------------------------------- the tool


def probe(checkpoint: str, train: str, validation: str, *, mode: str = "linear", seq_len: Optional[int] = None,
          steps: Optional[int] = None, lr: Optional[float] = None, weight_decay: Optional[float] = None,
          batch_size: Optional[int] = None, seed: int = 0, log=print) -> dict:
  """Validation accuracy of a linear probe or of fine-tuning (module docstring); None settings take the mode's
  defaults (linear: 500 steps, lr 1e-2, weight decay 1e-3, full batch; finetune: 300, 1e-4, 0, 32)."""
  if mode not in MODES:
    raise ConfigError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
  defaults = {"linear": (500, 1e-2, 1e-3, 0), "finetune": (300, 1e-4, 0.0, 32)}[mode]
  steps, lr, weight_decay, batch_size = (given if given is not None else d for given, d in
                                         zip((steps, lr, weight_decay, batch_size), defaults))
  train_texts, train_names = read_task(train)
  val_texts, val_names = read_task(validation)
  classes = sorted(set(train_names) | set(val_names))
  if len(set(train_names)) < 2:
    raise DataError(f"{train} has a single label ({train_names[0]!r}); a classifier needs at least two classes")
  unseen = sorted(set(val_names) - set(train_names))
  if unseen:
    log(f"maxlm: note: validation labels never seen in training (always wrong): {', '.join(unseen[:5])}")
  pre = pretrained.load(checkpoint)
  cfg = analysis_config(pre.cfg)
  codec = model_text.text_codec(cfg)
  lengths = [len(t) for t in codec.encode_batch(train_texts)]
  seq_len = seq_len or min(max(lengths), cfg.model.max_positions)
  if seq_len > cfg.model.max_positions:
    raise DataError(f"--seq-len {seq_len} exceeds the model's max_positions {cfg.model.max_positions}")
  (tr_ids, tr_mask, tr_cut), (va_ids, va_mask, va_cut) = (encode(codec, t, seq_len) for t in (train_texts, val_texts))
  index = {c: i for i, c in enumerate(classes)}
  y_train, y_val = (np.asarray([index[n] for n in names], np.int32) for names in (train_names, val_names))
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pre.params)
  if mode == "linear":
    x_train, x_val = standardise(hidden_features(cfg, params, tr_ids, tr_mask),
                                 hidden_features(cfg, params, va_ids, va_mask))
    clf = train_linear(x_train, y_train, len(classes), steps=steps, lr=lr, weight_decay=weight_decay,
                       batch_size=batch_size, seed=seed)
    train_pred, val_pred, features = predict_linear(clf, x_train), predict_linear(clf, x_val), x_train.shape[1]
  else:
    _, predict = finetune(cfg, params, {"ids": tr_ids, "mask": tr_mask, "labels": y_train}, len(classes),
                          steps=steps, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    train_pred, val_pred, features = predict(tr_ids, tr_mask), predict(va_ids, va_mask), cfg.model.hidden
  return {"accuracy": float(np.mean(val_pred == y_val)), "majority_baseline": majority_baseline(y_train, y_val),
          "mode": mode, "classes": len(classes), "train_accuracy": float(np.mean(train_pred == y_train)),
          "labels": classes, "train_rows": len(y_train), "validation_rows": len(y_val), "seq_len": seq_len,
          "truncated_rows": int(tr_cut + va_cut), "features": int(features), "steps": steps, "lr": lr,
          "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed, "checkpoint": checkpoint,
          "step": pre.step}


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("probe", help="linear probe or fine-tuning accuracy on a CSV text,label task "
                                          "(implicit bias)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True,
                 help="run dir, RUN@STEP, RUN@all (every kept step: JSON {results: [...]} and OUTPUT.png of the "
                      "accuracy over steps) or HF model dir")
  p.add_argument("--train", required=True, help="CSV with text,label columns (python -m maxlm.data pcfg-tasks)")
  p.add_argument("--validation", required=True, help="CSV with text,label columns")
  p.add_argument("--mode", default="linear", choices=MODES, help="linear: frozen features; finetune: all weights")
  p.add_argument("--seq-len", type=int, default=None, help="fixed row length (default: the longest training text)")
  p.add_argument("--steps", type=int, default=None, help="optimizer steps (linear 500, finetune 300)")
  p.add_argument("--lr", type=float, default=None, help="learning rate (linear 1e-2, finetune 1e-4)")
  p.add_argument("--weight-decay", type=float, default=None, help="linear: L2 penalty 1e-3; finetune: AdamW 0")
  p.add_argument("--batch-size", type=int, default=None, help="rows per step (linear 0 = full batch, finetune 32)")
  p.add_argument("--seed", type=int, default=0, help="seeds minibatch order and the fine-tuning head")
  p.add_argument("--output", required=True, help="JSON file to write (a new file)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier output of this tool")
  p.set_defaults(func=_cli)


def _cli(args) -> dict:
  return report(args.checkpoint, args.output, lambda spec: probe(
      spec, args.train, args.validation, mode=args.mode, seq_len=args.seq_len, steps=args.steps, lr=args.lr,
      weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed),
      lambda r: (f"{r['mode']} probe: validation accuracy {r['accuracy']:.4f} (majority baseline "
                 f"{r['majority_baseline']:.4f}, {r['classes']} classes, train accuracy {r['train_accuracy']:.4f})"),
      dict(key="accuracy", ylabel="validation accuracy", baseline_key="majority_baseline"),
      command="maxlm.analyze probe", overwrite=args.overwrite)
