"""Refactors keep the numbers: 20 training losses and fixed-key DDIM/DDPM samples of the
tiny config equal, bit for bit, the recorded ones (tests/fixtures/behaviour_tiny.npz, from
tests/fixtures/make_behaviour_fixture.py).

They were first recorded before the architecture refactor, and re-recorded (losses and
samples alike) when the data order moved to Grain (issue 20): the 20 training batches are
now Grain's shuffle of the digits, so the losses change, and the samples, drawn from the
parameters after those 20 steps, change with them. The re-recording was made from the commit
that reproduced the first recording bitwise with the old order (c42c09b), changing only the
input pipeline.

Bitwise holds on the machine class of the recording: the same jaxlib, core count and CPU vector
instruction sets (`behaviour.machine()`, saved in the fixture), since XLA's CPU kernels, and
with them the rounding of float32 sums, follow the host's ISA. Elsewhere the values must agree
to float32 rounding carried through 20 steps (relative 1e-5 for the losses, 1e-5 absolute for
samples in [-1, 1]); a wrong refactor moves them by far more.
"""

import os

import numpy as np
import pytest

import behaviour

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'behaviour_tiny.npz')


@pytest.fixture(scope='module')
def computed():
  return behaviour.compute()


def assert_reproduced(actual, recorded, *, rtol=0.0, atol=0.0, machine=None):
  if str(np.load(FIXTURE)['machine']) == (machine or behaviour.machine()):
    np.testing.assert_array_equal(actual, recorded)
  else:
    np.testing.assert_allclose(actual, recorded, rtol=rtol, atol=atol)


def test_on_another_machine_the_tolerance_still_catches_a_real_change(computed):
  """The off-class path accepts this machine's values and rejects a 1e-4 drift."""
  recorded = np.load(FIXTURE)
  other = 'another machine'
  assert_reproduced(computed['losses'], recorded['losses'], rtol=1e-5, machine=other)
  assert_reproduced(computed['ddim_params'], recorded['ddim_params'], atol=1e-5, machine=other)
  with pytest.raises(AssertionError):
    assert_reproduced(computed['losses'] * np.float32(1 + 1e-4), recorded['losses'],
                      rtol=1e-5, machine=other)
  with pytest.raises(AssertionError):
    assert_reproduced(computed['ddim_params'] + np.float32(1e-4), recorded['ddim_params'],
                      atol=1e-5, machine=other)


@pytest.mark.parametrize('name', ['losses', 'ddim_params', 'ddim_ema_params'])
def test_bitwise_equal_to_the_recorded_values(computed, name):
  recorded = np.load(FIXTURE)[name]
  assert computed[name].dtype == recorded.dtype
  if name == 'losses':
    assert_reproduced(computed[name], recorded, rtol=1e-5)
  else:
    assert_reproduced(computed[name], recorded, atol=1e-5)


@pytest.mark.parametrize('which', ['params', 'ema_params'])
def test_ddpm_differs_only_by_the_exact_respacing(computed, which):
  """Respacing now takes alpha_bar from its float64 values instead of float32-rounded betas
  (issue 12), which moves the 10-step DDPM variances by float32 rounding. With the old float32
  path the samples are the recorded ones (bitwise on the recording's machine class); with the
  exact one they stay within 2e-5."""
  recorded = np.load(FIXTURE)[f'ddpm_{which}']
  assert_reproduced(computed[f'ddpm_float32_respacing_{which}'], recorded, atol=1e-5)
  exact = computed[f'ddpm_{which}']
  assert not np.array_equal(exact, recorded)
  np.testing.assert_allclose(exact, recorded, rtol=0, atol=2e-5)
