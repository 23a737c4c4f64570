"""Alembic migrations of the controller's store, shipped in the package and run by ``Store.open``.

No ``alembic.ini`` is needed: ``fleet.schema.alembic_config`` points Alembic at this directory. Each
revision also sets ``schema_version``, the number ``fleet.schema.SCHEMA_VERSION`` and the ``meta`` table
carry (see ``fleet.schema``). A new revision, from a database at head::

    from alembic import command
    from fleet.schema import alembic_config
    command.revision(alembic_config(url="sqlite:///fleet.db"), "what changed", autogenerate=True)

then add ``schema_version = N`` to it, update ``meta`` in its ``upgrade`` (see ``v0002``), and raise
``SCHEMA_VERSION``. Revisions never import ``fleet.schema``'s tables: those are the newest schema, and a
revision must keep meaning what it meant when it was written.
"""
