"""Every reader of a commit record is linear in its size, and refuses what load refuses.

Guarantee 7 says a hostile record never makes a reader hang. A node table is
a flat list, but what it describes can be 10**5 containers deep (each holding
the next as its only child), hold 10**5 dict keys that are nodes of their own,
or name one node from two parents (a DAG, which walked as a tree is
exponential in its depth). `load` decodes any of them in linear time; here
`open(...).tensors()`, `keys()`, `view[key]` steps, `select=`, `info` and
`verify` must too.

Here every reader must read such records right (a walk exponential in the
depth never finishes, so the two-parents test cannot pass without a linear
walk). How their time scales with the size of the record is measured, not
asserted, by `python -m benchmarks.record_walks` (records of n and 4n nodes;
linear is about 4x): timing targets live in benchmarks/, never in tests.
"""

from __future__ import annotations

import zipfile

import pytest
import torch

import ckptstore
from ckptstore.api import info
from ckptstore.errors import CheckpointError, CorruptCheckpointError
from helpers.records import TENSOR, chain, dict_keys_record, forge

LARGE = 100_000                      # chain depth


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """A record of a chain LARGE deep with a tensor at the bottom."""
    nodes, path = chain(LARGE)
    return {LARGE: (str(forge(tmp_path_factory.mktemp(f"chain{LARGE}") / "c", nodes)), path)}


def _bottom(value, path):
    for k in path:
        value = value[k]
    return value




def test_every_reader_reads_a_chain_10_5_deep_right(chains):
    d, path = chains[LARGE]
    listed = list(ckptstore.open(d).tensors())
    assert [(p, t.shape, t.dtype) for p, t in listed] == [(path, torch.Size([4]), torch.float32)]
    assert ckptstore.open(d).keys() == ["k"]
    assert torch.equal(_bottom(ckptstore.load(d), path), torch.arange(4, dtype=torch.float32))
    assert torch.equal(_bottom(ckptstore.load(d, select=path), path), torch.arange(4, dtype=torch.float32))
    view = _bottom(ckptstore.open(d), path[:-1])
    assert torch.equal(view[path[-1]], torch.arange(4, dtype=torch.float32))
    assert ckptstore.verify(d).ok and ckptstore.verify(d, deep=True).ok
    assert info(d)["tensors"] == 1


def test_dict_keys_held_as_nodes_are_read_right(tmp_path):
    """4x10**4 tuple keys held as nodes (each was decoded with a table as long as the record)."""
    large = dict_keys_record(tmp_path / "k", 40_000)
    assert ckptstore.open(large).keys()[:2] == [(0,), (1,)]
    assert (123,) in ckptstore.open(large) and ckptstore.open(large)[(123,)] is None
    assert ckptstore.load(large, select=[((7,),)]) == {(7,): None}
    view = ckptstore.open(large)
    assert all(k in view for k in view) and len(view) == 40_000
    assert list(ckptstore.open(large).tensors()) == []


# ---------------------------------------------------------------- a node named twice

def test_a_node_with_two_parents_is_refused_by_every_walk_not_walked_exponentially(tmp_path):
    # 30 lists, each naming the next twice: walked as a tree, 2**30 visits.
    nodes = [["dict", ["a"], [1]]] + [["list", [i + 2, i + 2]] for i in range(30)] + [TENSOR]
    d = str(forge(tmp_path / "dag", nodes))
    for reader in (lambda: list(ckptstore.open(d).tensors()), lambda: list(ckptstore.open(d).walk()),
                   lambda: ckptstore.load(d), lambda: ckptstore.load(d, select="a"),
                   lambda: ckptstore.load(d, select=("a", 0, 0))):
        with pytest.raises(CorruptCheckpointError, match="two parents"):
            reader()
    assert ckptstore.open(d)["a"].keys() == [0, 1]       # one level: nothing named twice there
    assert not ckptstore.verify(d).ok and not ckptstore.verify(d, deep=True).ok


def test_a_deep_torch_save_file_is_walked_without_recursion(tmp_path):
    # A pickle 5000 lists deep (torch.save itself recurses too deeply to write one; torch.load reads it).
    path = tmp_path / "deep.pt"
    torch.save({"a": 1}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    (pkl,) = [n for n in members if n.endswith("data.pkl")]
    members[pkl] = b"\x80\x02}X\x01\x00\x00\x00a" + b"]" * 5000 + b"K\x01" + b"a" * 5000 + b"s."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with ckptstore.open(str(path)) as view:
        assert list(view.tensors()) == []
        *_, (last, kind, _) = view.walk()
        assert kind == "int" and last == ("a",) + (0,) * 5000


# ---------------------------------------------------------------- verify refuses what load refuses

def _malformed_chains() -> dict[str, list]:
    """Chains 50 deep whose structure load refuses, each in one place."""
    out = {}

    def at_bottom(name: str, change) -> None:
        nodes, _ = chain(50)
        change(nodes)
        out[name] = nodes
    at_bottom("child index pointing back", lambda n: n[49].__setitem__(1, [10]))
    at_bottom("child index pointing at itself", lambda n: n[49].__setitem__(1, [49]))
    at_bottom("child index out of range", lambda n: n[49].__setitem__(1, [51]))
    at_bottom("child index not an int", lambda n: n[49].__setitem__(1, ["50"]))
    at_bottom("node named twice", lambda n: n[49].__setitem__(1, [50, 50]))
    at_bottom("a node in the chain is not a tagged list", lambda n: n.__setitem__(25, {"list": [26]}))
    at_bottom("an unknown node kind", lambda n: n[30].__setitem__(0, "set"))
    at_bottom("dict keys and values of different lengths", lambda n: n[48].__setitem__(1, ["k", "j"]))
    at_bottom("a dict key of the wrong type", lambda n: n[48].__setitem__(1, [1.5]))
    at_bottom("odict _metadata pointing back", lambda n: n[2].append(1))
    at_bottom("a dict with _metadata", lambda n: n[0].append(49))
    at_bottom("tensor view past its storage", lambda n: n.__setitem__(50, ["tensor", 0, "float32", [5]]))
    at_bottom("tensor of a quantized dtype", lambda n: n.__setitem__(50, ["tensor", 0, "qint8", [4]]))
    at_bottom("tensor with a negative size", lambda n: n.__setitem__(50, ["tensor", 0, "float32", [-4]]))
    at_bottom("tensor stride of another length", lambda n: n.__setitem__(50, ["tensor", 0, "float32", [4],
                                                                              {"stride": [1, 1]}]))
    at_bottom("tensor of a blob that does not exist", lambda n: n.__setitem__(50, ["tensor", 7, "float32", [4]]))
    at_bottom("bytes node of a storage blob", lambda n: n.__setitem__(50, ["bytes", 0]))
    at_bottom("an ndarray of the wrong size", lambda n: n.__setitem__(50, ["ndarray", {"dtype": "<f8", "shape": [4],
                                                                                     "blob": 0}]))
    at_bottom("an int of 4301 digits", lambda n: n.__setitem__(50, ["int", "9" * 4301]))
    at_bottom("a float NaN pattern that is not a NaN", lambda n: n.__setitem__(50, ["float", "nan:7ff0000000000000"]))
    at_bottom("a numpy object dtype", lambda n: n.__setitem__(50, ["npscalar", {"dtype": "|O", "data": "00"}]))
    return out


MALFORMED = _malformed_chains()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_verify_refuses_a_malformed_chain_that_load_refuses(tmp_path, name):
    d = str(forge(tmp_path / "c", MALFORMED[name]))
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(d)
    for deep in (False, True):
        report = ckptstore.verify(d, deep=deep)
        assert not report.ok and report.problems, (deep, report)
    # The other readers answer or raise a CheckpointError, quickly.
    for reader in (lambda: list(ckptstore.open(d).tensors()), lambda: ckptstore.open(d).keys(), lambda: info(d)):
        try:
            reader()
        except CheckpointError as e:
            assert isinstance(e, CorruptCheckpointError), e


def test_verify_passes_what_load_returns_whatever_it_holds(tmp_path):
    import collections

    import numpy as np
    state = {"t": torch.randn(5, 3).t(), "e": torch.empty(0, 3), "meta": torch.empty(2, device="meta"),
             "p": torch.nn.Parameter(torch.ones(2)), "n": np.arange(6, dtype=">i8").reshape(2, 3),
             "n0": np.zeros((0, 4), np.float32), "s": np.float16(1.5), "b": b"", "bb": b"xyz",
             "od": collections.OrderedDict(a=1), "k": {(1, "x"): 2, None: 3, 2 ** 70: 4},
             "tied": [torch.arange(10)[2:5], torch.arange(3)], "size": torch.Size([2, 3]),
             "dtype": torch.bfloat16, "dev": torch.device("cuda:1"), "f": [float("nan"), -0.0, 10 ** 400]}
    state["tied"].append(state["tied"][0])
    ckptstore.save(state, tmp_path / "c")
    ckptstore.save({"c": collections.Counter("abc")}, tmp_path / "pickled", allow_pickle=True)
    for d in ("c", "pickled"):
        for deep in (False, True):
            report = ckptstore.verify(str(tmp_path / d), deep=deep)
            assert report.ok, (d, deep, report.problems)

