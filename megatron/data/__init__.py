"""Data path for pretraining: mmap indexed datasets, GPT samples, blending, samplers and the data-file registry.

Names are imported lazily (PEP 562) so that tools needing only the indexed dataset, such as
``tools/preprocess_data.py``, do not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "BlendableDataset": "blendable_dataset",
    "parse_data_path": "blendable_dataset",
    "DataFileError": "data_files",
    "default_data_dir": "data_files",
    "resolve": "data_files",
    "build_train_valid_test_datasets": "dataset_utils",
    "GPTDataset": "gpt_dataset",
    "parse_split": "gpt_dataset",
    "IndexedDatasetError": "indexed_dataset",
    "MMapIndexedDataset": "indexed_dataset",
    "MMapIndexedDatasetBuilder": "indexed_dataset",
    "MegatronPretrainingSampler": "samplers",
    "build_pretraining_data_loader": "samplers",
    "user_errors_unwrapped": "samplers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron.data' has no attribute {name!r}")
