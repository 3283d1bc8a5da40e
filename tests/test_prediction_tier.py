"""The prediction-only tier for real: loss-only optimisers tune a soft prompt through /v1/classify
with a predictions-tier key (no feature ever returned), every query counted as the server bills."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from client.data import few_shot_split, load_dataset
from client.errors import CredentialsError
from client.prediction_tier import ClassifyClient, tune_on_predictions
from server.store import SqliteStore
from tests.helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("pred-tier") / "p.db") as srv:
        srv.create_key("pred", scopes=["classify", "tokens"])  # the predictions tier
        yield srv


@pytest.mark.parametrize("optimizer", ["estimator", "cmaes", "spsa-gc", "zip"])
def test_loss_only_optimisers_run_through_classify(server: ServerProcess, optimizer: str) -> None:
    split = few_shot_split(load_dataset("digits"), 2, 1, max_test_per_class=2)
    classes = len(split.class_names)
    with SqliteStore(server.db) as store:
        before = store.ledger_total(store.get_key("pred").id)
    with ClassifyClient(server.url, server.api_key) as api:
        run = tune_on_predictions(api, split, optimizer=optimizer, steps=2, batch_size=4, eval_every=2)
        counted = api.counter
        with pytest.raises(CredentialsError, match="tier"):  # no features on this tier
            api.embed_texts(["a cat"])
    with SqliteStore(server.db) as store:
        spent = store.ledger_total(store.get_key("pred").id) - before
    assert counted.items == spent > 0
    # Each loss evaluation is one classify call on the 4-image batch: 4 images + C class prompts.
    assert counted.loss_evaluations >= 2 and counted.calls > counted.loss_evaluations
    assert len(run.losses) == 2 and all(loss == loss for loss in run.losses)  # finite, not NaN
    assert 0.0 <= run.test_accuracy <= 1.0 and classes == 10
