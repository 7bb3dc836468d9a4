#!/usr/bin/env bash
# One device call that checks a session's GPU work: every GPU test (tests/gpu + the block-sparse
# kernel tests on CUDA, fixed launch parameters), then the sliding-window kernel bench and the
# linear-attention suite (fla from .whl/ when carried). The steps live in scripts/gpu_round.sh.
exec env STEPS="${STEPS:-tests swa linear}" TESTS="${TESTS:-tests/gpu tests/ops/test_block_sparse_kernel.py ${EXTRA_TESTS:-}}" \
    TEST_TIMEOUT="${TEST_TIMEOUT:-200}" bash "$(dirname "${BASH_SOURCE[0]}")/gpu_round.sh"
