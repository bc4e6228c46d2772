"""A variational autoencoder (and, with `:ae`, a plain autoencoder) on sklearn's digits.

Pixels are scaled to [0, 1] and modelled as Bernoulli probabilities; the VAE maximises the
ELBO = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)). summary.json reports, per test image,
eval.elbo (nats), eval.recon_nll, eval.kl and eval.recon_mse (squared error per pixel).

Command:   jaxbig train experiments/vae_digits.py [key=value ...]
           jaxbig train experiments/vae_digits.py:ae   (the autoencoder)
Smoke:     jaxbig train experiments/vae_digits.py:smoke   (a few steps, for tests)
Hardware:  any CPU.
Wall time: about 10 s on a 2-core CPU (compile 2 s).
Expected:  VAE: eval.elbo -24.1 nats per test image (recon_nll 20.3 + kl 3.8),
           eval.recon_mse 0.033 per pixel. Autoencoder (:ae): eval.recon_mse 0.012.
"""

import ml_collections

import cnn_digits


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  variant, _, size = arg.partition(',')
  c = cnn_digits.get_config()
  c.data.normalize = 'minmax'  # Pixels into [0, 1].
  c.data.augment_shift = 0  # Reconstruct the images as they are.
  c.data.batch_size = 64

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vae'  # vae | autoencoder.
  c.model.widths = (256, 128)  # Encoder hidden widths (the decoder mirrors them).
  c.model.latent = 8  # Latent dimensions.
  c.model.init = 'he'  # Kernel initialiser: normal | glorot | he | lecun.
  c.model.init_std = 0.02  # Standard deviation when init=normal.

  c.train.loss = 'elbo'  # elbo (VAE) | recon (reconstruction only, autoencoder).
  c.train.steps = 3000
  c.train.eval_every = 500
  c.train.ckpt_every = 1000
  c.opt.lr = 1e-3
  c.opt.warmup_steps = 100
  c.opt.weight_decay = 0.0

  if variant == 'ae':
    c.model.name, c.train.loss = 'autoencoder', 'recon'
  elif variant and variant != 'smoke':
    raise ValueError(f"unknown variant '{arg}'; choose from ae, smoke, ae,smoke")
  if 'smoke' in (variant, size):
    c.model.widths, c.model.latent = (32, 16), 4
    c.data.batch_size, c.data.eval_batch_size = 32, 128
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 20, 5, 10, 10
    c.opt.warmup_steps = 2
  return c
