"""`bertforge serve`: a local web playground for models and runs (fill-mask, NSP, attention, fine-tuned
predictions, training curves) and the JSON API its pages use.

    table = load_table(["tiny=RUN/model"], ["RUN"], torch.device("cpu"))
    server = make_server(table, "127.0.0.1", 0)     # port 0: any free port; server.url says which
    server.serve_forever()
"""

from bertforge.serve.app import make_server
from bertforge.serve.models import load_table

__all__ = ["load_table", "make_server"]
