"""One module per subcommand of ``nn-core``: each has ``add(subparsers)`` and ``run(args)``."""
