"""Which process writes which tensor of a checkpoint saved by many processes, and pieces put back together."""

from __future__ import annotations

import numpy as np
import pytest

from keepbest import codec
from keepbest.errors import CorruptCheckpointError
from keepbest.payload import TensorPayload, owners
from keepbest.store import LocalStore

BIG, SMALL = [[256], "F32", 1024], [[1], "F32", 4]


def test_replicated_tensors_are_shared_out_by_size_and_each_is_written_once():
    held = [{"m": {"a": BIG, "b": BIG, "c": SMALL}}] * 2
    mine = owners(held)
    assert mine == [{"m": ["a", "c"]}, {"m": ["b"]}]  # (a tie goes to the lower process)


def test_a_tensor_held_by_one_process_is_written_by_it():
    held = [{"m": {"w": BIG}}, {"m": {"w": BIG}, "opt": {"shard1": BIG}}]
    assert owners(held) == [{"m": ["w"]}, {"m": [], "opt": ["shard1"]}]


def test_a_tensor_keeps_its_previous_writer_while_that_process_holds_it():
    held = [{"m": {"a": BIG, "b": BIG}}] * 2
    assert owners(held, {("m", "a"): 1, ("m", "b"): 1}) == [{"m": []}, {"m": ["a", "b"]}]


def test_a_tensor_whose_previous_writer_no_longer_holds_it_gets_a_new_one():
    held = [{"m": {"a": BIG}}, {"m": {}}]
    assert owners(held, {("m", "a"): 1}) == [{"m": ["a"]}, {"m": []}]


def test_one_name_with_two_shapes_on_two_processes_is_refused():
    with pytest.raises(ValueError, match=r"Cannot save tensor 'w' of m: process 0 holds it with shape/dtype "
                                         r"\[256\]/F32 and process 1 with \[1\]/F32"):
        owners([{"m": {"w": BIG}}, {"m": {"w": SMALL}}])


def test_a_process_refuses_to_write_a_tensor_it_did_not_copy(tmp_path):
    payload = TensorPayload({"m.safetensors": {}}, known={"m.safetensors": {"w": BIG}})
    assert payload.held() == {"m.safetensors": {"w": BIG}}
    staged = LocalStore(tmp_path).stage("ckpt", "dir")
    with pytest.raises(RuntimeError, match="Cannot write tensor 'w' of m.safetensors: this process now writes it, "
                                           "but did not copy it"):
        payload.write_part(staged, 1, {"m.safetensors": ["w"]})


def test_pieces_of_a_sharded_variable_are_put_back_together():
    whole = np.arange(24, dtype=np.float32).reshape(4, 6)
    pieces = {codec.piece_name("k", ((0, 4), (0, 3))): whole[:, :3], codec.piece_name("k", ((0, 4), (3, 6))): whole[:, 3:],
              "b": np.ones(2)}
    out = codec.assemble(pieces, {"k": [4, 6]}, "ckpt")
    assert sorted(out) == ["b", "k"] and out["k"].tobytes() == whole.tobytes()


@pytest.mark.parametrize("index, count", [(((0, 4), (3, 5)), r"\(4 elements missing, 0 twice\)"),
                                          (((0, 4), (2, 6)), r"\(0 elements missing, 4 twice\)")])
def test_pieces_that_leave_a_gap_or_overlap_are_corrupt(index, count):
    whole = np.zeros((4, 6), np.float32)
    pieces = {codec.piece_name("k", ((0, 4), (0, 3))): whole[:, :3],
              codec.piece_name("k", index): whole[:, index[1][0]:index[1][1]]}
    with pytest.raises(CorruptCheckpointError, match="the pieces of variable 'k' do not cover it exactly once " + count):
        codec.assemble(pieces, {"k": [4, 6]}, "ckpt")


def test_a_piece_outside_its_variable_is_corrupt():
    pieces = {codec.piece_name("k", ((0, 4), (0, 9))): np.zeros((4, 9), np.float32)}
    with pytest.raises(CorruptCheckpointError, match=r"piece 'k\[0:4,0:9\]' does not fit variable 'k' of shape \[4, 6\]"):
        codec.assemble(pieces, {"k": [4, 6]}, "ckpt")


def test_a_variable_listed_as_pieces_without_any_is_corrupt():
    with pytest.raises(CorruptCheckpointError, match="no piece of it is stored"):
        codec.assemble({}, {"k": [4, 6]}, "ckpt")
