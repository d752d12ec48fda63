"""Loading a model, once, the same way for every command that runs one (`chat`, `serve`, `plan --calibrate`,
`eval`): `resolve` says which local GGUF a MODEL means, `model_file` reads its header once (checked, with the
facts a plan needs), `placement` is where the command line puts it, `prepared` joins them into the load
parameters and prompt renderer an engine starts from, and `engines` names the engines that can run it.

Nothing is imported here, so `import dsv4cli.load.resolve` stays as light as the module itself.
"""
