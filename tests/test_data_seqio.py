"""seqio adapter: a clear error without the extra; with seqio installed, batches from a registered task."""

import dataclasses

import numpy as np
import pytest

from maxlm.data_pipelines import build_train_iterator, describe
from maxlm.core.config import DataConfig
from maxlm.core.errors import DataError


def _cfg(task=""):
  return dataclasses.replace(DataConfig(), source="seqio", seqio_task=task, shuffle=False, document_masking=False,
                             prefetch=0, num_workers=0)


def test_missing_seqio_names_the_extra():
  try:
    import seqio  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("seqio is installed")
  except ImportError:
    pass
  with pytest.raises(DataError, match=r"maxlm\[seqio\]"):
    build_train_iterator(_cfg("any"), seq_len=8, batch_size=2, seed=0)


def test_seqio_task_batches_and_resume():
  seqio = pytest.importorskip("seqio")
  tf = pytest.importorskip("tensorflow")
  vocab = seqio.PassThroughVocabulary(size=50, eos_id=1)
  docs = [list(range(2, 2 + n)) for n in range(3, 30)]
  name = "maxlm_test_task"
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_generator(
                lambda: ({"targets": np.array(d, np.int32)} for d in docs),
                output_signature={"targets": tf.TensorSpec([None], tf.int32)}),
            splits=["train", "validation"]),
        preprocessors=[], output_features={"targets": seqio.Feature(vocab, add_eos=True)})
  info = describe(_cfg(name))
  assert info.vocab_size == 50 and info.separator_id == 1
  it = build_train_iterator(_cfg(name), seq_len=8, batch_size=2, seed=0)
  run = [next(it) for _ in range(4)]
  stream = np.concatenate([d + [1] for d in docs])
  np.testing.assert_array_equal(run[0]["inputs"][0], stream[:8])
  state = it.get_state()
  again = build_train_iterator(_cfg(name), seq_len=8, batch_size=2, seed=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"], next(it)["inputs"])
