"""The `bdt` command's subcommand groups, one module each with `register(subparsers)`
(bdt/cli.py lists them). Heavy libraries (torch, ray) are imported inside the handlers, so
`bdt --help` stays fast."""
