"""digit_pairs with one-sided captions, for composing conditions (AND / NOT).

configs/digit_pairs.py's run, except that 30% of the training captions name one side only
("a 3 on the left", "a seven on the right"; `jaxddpm.data.digit_pairs.HALF_TEMPLATES`), so
the model knows each side's condition alone. Composable Diffusion (Liu et al. 2022) then
asks for both sides as a conjunction, eps(x | null) + sum_i w_i (eps(x | c_i) - eps(x | null)),
and for "not a 3" with a negative weight (`jaxddpm.solvers.composition`):

  python run_train.py --config=configs/digit_pairs_compose.py --workdir=runs/digit_pairs_compose
  python run_sample.py --workdir=runs/digit_pairs_compose \\
      --prompt="a 3 on the left" --prompt="a 7 on the right" --prompt_weights=3,3
  python benchmarks/composition.py --workdir=runs/digit_pairs_compose
"""

from configs import digit_pairs


def get_config():
  config = digit_pairs.get_config()
  config.data.half_captions = 0.3
  return config
