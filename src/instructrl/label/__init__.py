"""Human-feedback collection: a labeling web app and its admin commands (InstructGPT §3.4, App. B).

Labelers write demonstrations for prompts and rank K model responses per prompt (with the paper's
per-response metadata and a 1-7 quality score); the admin commands feed the database and export the
labels in the formats ``instructrl sft`` and ``instructrl rm`` train on.

Commands (each a module with ``Config`` and ``run(cfg)``)
    ``label create-labeler``  :mod:`~instructrl.label.create_labeler`
    ``label load-prompts``    :mod:`~instructrl.label.load_prompts`
    ``label add-samples``     :mod:`~instructrl.label.add_samples`
    ``label assign``          :mod:`~instructrl.label.assign`
    ``label serve``           :mod:`~instructrl.label.serve` (the web app: :mod:`~instructrl.label.app`)
    ``label export``          :mod:`~instructrl.label.export`
    ``label stats``           :mod:`~instructrl.label.stats`

Internals: :mod:`~instructrl.label.db` (SQLite/WAL through SQLAlchemy 2), :mod:`~instructrl.label.migrations`
(versioned schema), :mod:`~instructrl.label.auth` (secrets, sessions, CSRF tokens),
:mod:`~instructrl.label.forms` (input validation), :mod:`~instructrl.label.tasks` (items, assignments,
idempotent submissions). Inter-labeler agreement is :mod:`instructrl.agreement`, shared with the sandbox.
"""
