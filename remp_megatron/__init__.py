"""ReMP-Megatron: serve Megatron-format LLMs and change TP×PP while serving.

The DeepSpeed-MII-style entry points (``serve``, ``client``, ``pipeline``) live with the front end
in ``server.python_api``; see its docstring.
"""
from . import jit_off

jit_off.install()  # before anything imports megatron

from server.python_api import Client, Pipeline, Response, SwitchResult, client, pipeline, serve

__all__ = ["serve", "client", "pipeline", "Client", "Pipeline", "Response", "SwitchResult"]
