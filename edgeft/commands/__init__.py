"""The sub-commands of ``edgeft`` (``edgeft.cli``), grouped by what they work on: ``model`` (export, train,
deploy, predict), ``coordinator`` (server, tokens, certs), ``client`` (the device agent) and ``fleet`` (demo,
simulate). Each ``add_*`` function adds one sub-command's parser; its ``func`` parses the flags into a config
and calls one function of the library."""
