"""Read any checkpoint, sharded or single-process, as global tensors or any selection of them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from moetrain.checkpoint.integrity import (
    MANIFEST_FILE,
    WITH_MANIFEST_KEY,
    check_inside,
    earlier_hint,
    read_manifest,
    verify_file,
)
from moetrain.checkpoint.layout import (
    OPTIMIZER_PARAM_NAMES,
    holds_optimizer_state,
    set_optimizer_state,
)
from moetrain.checkpoint.storage import (
    ALIASES_KEY,
    MODEL_FILE,
    SHARD_INDEX_FILE,
    SHARD_PREFIX,
    STATE_FILE,
    CheckpointError,
    load_state,
    resolve_checkpoint_dir,
)
from moetrain.parallel.pieces import Piece, model_pieces


@dataclass
class Checkpoint:
    """What load_checkpoint returns; tensors are on CPU."""

    iteration: int
    model_state: dict[str, Tensor]
    optimizer_state: dict
    extra: dict
    path: str


class CheckpointReader:
    """Reads global tensors, or any piece of them, from a sharded or a single-process checkpoint."""

    def __init__(self, path: str, verify_extra_files: bool = True, optimizer: bool = True) -> None:
        """`verify_extra_files` False leaves the caller's own files (tokenizer.json) to the caller to verify;
        `optimizer` False, for a caller that reads only weights, maps state.pt's optimizer tensors
        instead of reading them."""
        self.path = path
        # weights_only first: pickled code is refused whatever the manifest says
        self.state = load_state(path, mmap=not optimizer)
        # every file but the shards is checked against the manifest now, each shard when first opened
        self.manifest = read_manifest(path)
        for name in self.manifest or {}:
            if not name.startswith(SHARD_PREFIX) and (verify_extra_files or name in (STATE_FILE, MODEL_FILE,
                                                                                      SHARD_INDEX_FILE)):
                verify_file(path, name, self.manifest)
        self.sharded = os.path.isfile(os.path.join(path, SHARD_INDEX_FILE))
        self._files: dict[str, object] = {}
        self.aliases: dict[str, str] = {}  # tied key -> the key it is stored under
        if self.sharded:
            self.index, self.aliases = self._read_index()
        else:  # model.safetensors stays on disk: each tensor is read when asked for
            if not os.path.isfile(os.path.join(path, MODEL_FILE)):
                raise FileNotFoundError(f"checkpoint {path!r} has no {MODEL_FILE}; it is incomplete or not a "
                                        "moetrain checkpoint")
            model_file = self._open(MODEL_FILE, verify=False)  # verified above, when the manifest lists it
            self.aliases = {f"model/{alias}": f"model/{stored}" for alias, stored in
                            json.loads((model_file.metadata() or {}).get(ALIASES_KEY, "{}")).items()}
            self._model_keys = {f"model/{key}" for key in model_file.keys()}
            self._optimizer = self._named_optimizer_state()
        if self.manifest is None and self.state.get(WITH_MANIFEST_KEY):
            raise CheckpointError(f"{path} was written with a {MANIFEST_FILE} and has lost it, so none of its files "
                                  f"can be checked; {earlier_hint(path)}")

    def _read_index(self) -> tuple[dict[str, list[dict]], dict[str, str]]:
        """index.json's tensors and aliases; refused if it names a file outside the checkpoint."""
        index_path = os.path.join(self.path, SHARD_INDEX_FILE)
        try:
            with open(index_path) as f:
                index = json.load(f)
            tensors = index["tensors"]
            files = {entry["file"] for entries in tensors.values() for entry in entries}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index_path} is corrupt ({type(error).__name__}: {error}); "
                                  f"{earlier_hint(self.path)}") from None
        for file in files:
            check_inside(self.path, file, index_path)
        return tensors, index["aliases"] if "aliases" in index else self._ties_from_config()

    def _ties_from_config(self) -> dict[str, str]:
        """Tied keys of an index written before indexes recorded them: the saved model config's ties."""
        from moetrain.config import Config
        from moetrain.model import tied_weights

        config = self.state["extra"].get("config")
        if config is None:
            return {}
        return {f"model/{alias}": f"model/{stored}"
                for alias, stored in tied_weights(Config.from_dict(config).model).items()}

    def _named_optimizer_state(self) -> dict[str, Tensor]:
        """A torch optimizer state_dict (keyed by position) re-keyed by parameter name."""
        optimizer = self.state["optimizer"]
        if not optimizer or not optimizer.get("state"):
            return {}
        names = self.state["extra"].get(OPTIMIZER_PARAM_NAMES)
        if names is None:
            return {}  # saved by an older moetrain: weights only, the optimizer starts afresh
        return {f"optim/{names[int(position)]}/{key}": value
                for position, state in optimizer["state"].items() for key, value in state.items()}

    def keys(self) -> list[str]:
        if self.sharded:
            return list(self.index)
        return [*self._model_keys, *self.aliases, *self._optimizer]

    def model_state(self) -> dict[str, Tensor]:
        """All model tensors, whole (what a single-process model loads); tied names share one tensor."""
        if self.sharded:
            state = {key[len("model/"):]: self.read(key, Piece(tuple(entries[0]["shape"])))
                     for key, entries in self.index.items() if key.startswith("model/")}
        else:
            model_file = self._open(MODEL_FILE)
            state = {key[len("model/"):]: model_file.get_tensor(key[len("model/"):]) for key in self._model_keys}
        for alias, stored in self.aliases.items():
            alias, stored = alias[len("model/"):], stored[len("model/"):]
            if alias not in state and stored in state:
                state[alias] = state[stored]
        return state

    def read(self, key: str, want: Piece) -> Tensor:
        """The selection `want` of global tensor `key`, assembled from the pieces that hold it."""
        if not self.sharded:
            key = self.aliases.get(key, key)
            if key in self._optimizer:
                return _select(self._optimizer[key], want, key, self.path)
            if key not in self._model_keys:
                raise CheckpointError(f"{self.path} has no tensor {key!r}; it was saved from a different model")
            return _select(self._open(MODEL_FILE).get_tensor(key[len("model/"):]), want, key, self.path)
        if key not in self.index:
            key = self.aliases.get(key, key)  # a tied tensor, stored under its other name
        if key not in self.index:
            raise CheckpointError(f"{self.path} has no tensor {key!r}; it was saved from a different model")
        pieces = [(Piece.from_json(entry), entry["file"]) for entry in self.index[key]]
        whole = next((file for piece, file in pieces if piece.dim is None), None)
        if whole is not None:
            return _select(self._open(whole).get_tensor(key), want, key, self.path)
        dim = pieces[0][0].dim
        if pieces[0][0].shape != want.shape:
            raise CheckpointError(f"{key} has shape {list(pieces[0][0].shape)} in {self.path} but the model needs "
                                  f"{list(want.shape)}; load it with the model flags it was saved with")
        if want.dim not in (None, dim):  # split along another dimension when saved: assemble it whole first
            return _select(self.read(key, Piece(want.shape)), want, key, self.path)
        wanted = want.index if want.dim is not None else tuple(range(want.shape[dim]))
        if not wanted:  # a ZeRO-3 rank's empty shard of a small tensor
            piece, file = pieces[0]
            return self._open(file).get_tensor(key).narrow(dim, 0, 0)
        target = {g: j for j, g in enumerate(wanted)}
        out, covered = None, 0
        for piece, file in pieces:
            pairs = [(i, target[g]) for i, g in enumerate(piece.index) if g in target]
            if not pairs:
                continue
            tensor = self._open(file).get_tensor(key)
            if out is None:
                shape = list(want.shape)
                shape[dim] = len(wanted)
                out = tensor.new_empty(shape)
            source, destination = (torch.tensor(column) for column in zip(*pairs))
            out.index_copy_(dim, destination, tensor.index_select(dim, source))
            covered += len(pairs)
        if covered != len(wanted):
            raise CheckpointError(f"{self.path} holds {covered} of the {len(wanted)} slices of {key} this layout "
                                  "needs; the checkpoint is incomplete")
        return out

    def _open(self, file: str, verify: bool = True):
        if file not in self._files:
            if verify:
                verify_file(self.path, file, self.manifest)
            try:
                self._files[file] = safe_open(os.path.join(self.path, file), framework="pt")
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{os.path.join(self.path, file)} is corrupt, truncated or missing ({error}); "
                                      f"{earlier_hint(self.path)}") from None
        return self._files[file]


def _select(full: Tensor, want: Piece, key: str, path: str) -> Tensor:
    if tuple(full.shape) != want.shape:
        raise CheckpointError(f"{key} has shape {list(full.shape)} in {path} but the model needs "
                              f"{list(want.shape)}; load it with the model flags it was saved with")
    if want.dim is None:
        return full
    return full.index_select(want.dim, torch.tensor(want.index, dtype=torch.long))


@torch.no_grad()
def load_model_into(reader: CheckpointReader, model: nn.Module) -> dict[str, tuple[str, Tensor, Piece]]:
    """Fill this rank's model tensors from any layout's checkpoint; return their pieces (model_pieces)."""
    entries = model_pieces(model)
    for global_name, tensor, piece in entries.values():
        tensor.copy_(reader.read(f"model/{global_name}", piece))
    return entries


@torch.no_grad()
def load_into(reader: CheckpointReader, model: nn.Module, optimizer) -> None:
    """Fill this rank's model tensors and optimizer state from any layout's checkpoint."""
    entries = load_model_into(reader, model)
    state_keys: dict[str, list[str]] = {}
    for key in reader.keys():
        if key.startswith("optim/"):
            global_name, state_key = key[len("optim/"):].rsplit("/", 1)
            state_keys.setdefault(global_name, []).append(state_key)
    for name, param in model.named_parameters():
        global_name, _, piece = entries[name]
        if not holds_optimizer_state(optimizer, param) or global_name not in state_keys:
            continue
        state = {}
        for state_key in state_keys[global_name]:
            value_piece = piece if state_key != "step" else Piece(())
            state[state_key] = reader.read(f"optim/{global_name}/{state_key}", value_piece)
        set_optimizer_state(optimizer, param, state)


def load_checkpoint(load_dir: str, iteration: int | None = None, verify_extra_files: bool = True) -> Checkpoint:
    """Load the checkpoint named by ``load_dir/latest``, a given iteration, or ``load_dir`` itself
    when it is an ``iter_*`` directory, in either format. Tensors come back on CPU; nothing but plain
    data is unpickled."""
    reader = CheckpointReader(resolve_checkpoint_dir(load_dir, iteration), verify_extra_files)
    return Checkpoint(
        iteration=int(reader.state["iteration"]),
        model_state=reader.model_state(),
        optimizer_state=reader.state["optimizer"],
        extra=reader.state["extra"],
        path=reader.path,
    )
