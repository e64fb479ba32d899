"""The training and demo configs that ship with etalk-jax: each module's `get_config(variant)`
(ml_collections), read by `etalk train --config FILE.py[:variant]` or by name
(`--config vaid:tiny`; `etalk_jax.train.config.load_config`)."""
