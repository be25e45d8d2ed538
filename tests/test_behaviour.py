"""Refactors keep the numbers: 20 training losses and fixed-key DDIM/DDPM samples of the
tiny config equal, bit for bit, what the code computed before the architecture refactor
(tests/fixtures/behaviour_tiny.npz, from tests/fixtures/make_behaviour_fixture.py)."""

import os

import numpy as np
import pytest

import behaviour

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'behaviour_tiny.npz')


@pytest.fixture(scope='module')
def computed():
  return behaviour.compute()


@pytest.mark.parametrize('name', ['losses', 'ddim_params', 'ddim_ema_params', 'ddpm_params',
                                  'ddpm_ema_params'])
def test_bitwise_equal_to_the_recorded_values(computed, name):
  recorded = np.load(FIXTURE)[name]
  assert computed[name].dtype == recorded.dtype
  np.testing.assert_array_equal(computed[name], recorded)
