"""Shared test settings.

``pytest -m "not slow"`` is the fast subset the README documents (under a minute on a quiet
2-core machine, touching every module of repulsor): it leaves out the tests marked slow in
their files (subprocesses, training to a target) and the tests listed in ``SLOW`` below, each
measured above about a second (``pytest --durations=0``).

REPULSOR_TEST_THREADS limits torch's intra-op threads, so that several test runs on a
two-core machine do not slow each other down (two competing torch processes can be 12x
slower). CI leaves it unset and uses every core.
"""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("REPULSOR_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["REPULSOR_TEST_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A one-epoch prototype run on the digits that trains in about a second (import it with
# ``from conftest import TINY``; copy it before changing it).
TINY = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "width": 0.25},
    "prototypes": {"dim": 16, "epochs": 10},
    "train": {"method": "prototype", "epochs": 1, "batch_size": 64, "lr": 0.05, "precision": "fp32",
              "eps": 0.1, "alpha": 0.025, "val_n": 50, "attack_steps": 2, "val_attack_steps": 2},
    "eval": {"n": 50, "eps": 0.1, "after_train": False},
}


@pytest.fixture
def shared_data() -> Path:
    """The offline data sets beside the checkout; tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    return SHARED_DATA


SLOW = {
    # sharing a module fixture that trains (its set-up cost moves to whichever runs first)
    "tests/test_compare.py::test_comparison_json_and_tables_hold_every_method",
    "tests/test_compare.py::test_transfer_from_ce_matches_its_white_box_pgd",
    "tests/test_compare.py::test_tables_list_failures_and_sanity_warnings",
    "tests/test_compare.py::test_changed_config_does_not_reuse_a_run",
    "tests/test_report.py::test_report_reuses_analysis_files",
    "tests/test_report.py::test_report_renders_in_chromium",
    # measured
    "tests/test_analysis.py::test_analyse_run_on_a_fake_run",
    "tests/test_analysis.py::test_analyse_run_on_a_real_tiny_run",
    "tests/test_analysis.py::test_robustness_curve_non_increasing_and_one_entry_per_eps",
    "tests/test_cli.py::test_analyse_prints_its_key_numbers",
    "tests/test_compare.py::test_a_missing_suite_is_rerun_alone",
    "tests/test_compare.py::test_a_setting_only_another_method_reads_does_not_retrain",
    "tests/test_compare.py::test_cli_prints_the_tables",
    "tests/test_compare.py::test_interrupted_compare_trains_only_the_remaining_runs",
    "tests/test_compare.py::test_second_compare_neither_retrains_nor_reevaluates",
    "tests/test_data.py::test_shared_mnist",
    "tests/test_export.py::test_exported_runs_and_built_models_match_in_a_fresh_process",
    "tests/test_fab_square.py::test_breaks_undefended_model_and_never_helps_it[square-l2]",
    "tests/test_fab_square.py::test_fab_finds_the_minimal_perturbation_of_a_linear_model[l2]",
    "tests/test_fab_square.py::test_fab_finds_the_minimal_perturbation_of_a_linear_model[linf]",
    "tests/test_fab_square.py::test_model_mode_weights_and_grads_untouched[square-l2-train]",
    "tests/test_fab_square.py::test_output_inside_eps_ball_and_box[fab-l2]",
    "tests/test_fab_square.py::test_output_inside_eps_ball_and_box[fab-linf]",
    "tests/test_fab_square.py::test_output_inside_eps_ball_and_box[fab_targeted-l2]",
    "tests/test_fab_square.py::test_output_inside_eps_ball_and_box[fab_targeted-linf]",
    "tests/test_fab_square.py::test_output_inside_eps_ball_and_box[square-l2]",
    "tests/test_fab_square.py::test_output_inside_eps_ball_and_box[square-linf]",
    "tests/test_fab_square.py::test_reproducible_and_independent_of_global_rng[fab_targeted-l2]",
    "tests/test_fab_square.py::test_reproducible_and_independent_of_global_rng[fab_targeted-linf]",
    "tests/test_fab_square.py::test_reproducible_and_independent_of_global_rng[square-l2]",
    "tests/test_fab_square.py::test_reproducible_and_independent_of_global_rng[square-linf]",
    "tests/test_fab_square.py::test_square_query_budget[l2]",
    "tests/test_models.py::test_full_size_parameter_counts",
    "tests/test_prototypes.py::test_bounded_even_with_long_large_steps[cosine]",
    "tests/test_prototypes.py::test_bounded_even_with_long_large_steps[l2]",
    "tests/test_prototypes.py::test_bounded_even_with_long_large_steps[linf]",
    "tests/test_report.py::test_compare_report",
    "tests/test_report.py::test_report_is_self_contained_and_complete",
    "tests/test_sanity.py::test_a_check_that_crashes_is_reported_not_raised",
    "tests/test_sanity.py::test_checks_are_seeded_and_print_nothing",
    "tests/test_sanity.py::test_gradients_that_vanish_under_autocast_are_caught",
    "tests/test_sanity.py::test_hard_quantisation_is_caught",
    "tests/test_sanity.py::test_saturated_softmax_is_caught",
    "tests/test_sanity.py::test_trained_convnet_passes_every_check_and_is_left_as_it_was",
    "tests/test_sanity.py::test_trained_mlp_passes_every_check[l2]",
    "tests/test_sanity.py::test_trained_mlp_passes_every_check[linf]",
    "tests/test_sanity.py::test_verdicts_have_the_documented_keys_and_types",
    "tests/test_train.py::test_fgsm_rs_without_overfitting_runs_to_the_end",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
