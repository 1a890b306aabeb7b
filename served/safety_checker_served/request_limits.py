"""What every served Python model refuses before it computes anything.

One home (the embedder's version folder); the export copies it next to the
normaliser's and the postprocessor's model.py. It reads its limits from the
model config's `parameters` (rendered from export/models.py) and imports
nothing from Triton, so the messages are plain text the model turns into
INVALID_ARG errors:

* a request parameter the checker does not know (a mistyped "strictnes" must
  never fall back to the default strictness), named with the accepted ones;
  Triton's reserved keys pass (its front ends consume them; gRPC passes
  binary_data_output on);
* a parameter given twice (the HTTP/JSON protocol can spell a key twice);
* parameters whose JSON text is longer than `max_parameter_bytes`;
* a batch larger than `max_request_images` (Triton's own max_batch_size check
  comes first; this one holds whatever config a deployment writes).
"""

import json

# How much of a client's text an error message repeats.
QUOTE_CHARS = 64


def quote(value):
    """repr(value), cut to QUOTE_CHARS characters: an error message never grows with what a client sent."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def _names(text):
    return tuple(name.strip() for name in text.split(",") if name.strip())


class RequestLimits:
    def __init__(self, parameters):
        """`parameters`: the model config's parameters, key -> string value."""
        self.accepted = _names(parameters["request_parameters"])
        self.reserved = _names(parameters["triton_request_parameters"])
        self.max_images = int(parameters["max_request_images"])
        self.max_parameter_bytes = int(parameters["max_parameter_bytes"])

    def parameters(self, text):
        """(the checker's parameters as a dict, None) for a request's parameters() text, or ({}, message)."""
        text = text or "{}"
        size = len(text.encode("utf-8"))
        if size > self.max_parameter_bytes:
            return {}, f"request parameters take {size} bytes, more than the {self.max_parameter_bytes} allowed"
        try:
            pairs = json.loads(text, object_pairs_hook=list)
        except ValueError:
            return {}, "request parameters are not readable"
        # An object reads as a list of (name, value) pairs; anything else (an array, a number) is not parameters.
        if not isinstance(pairs, list) or not all(isinstance(pair, tuple) for pair in pairs):
            return {}, "request parameters are not readable"
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            return {}, f"request parameter {quote(repeated[0])} is given more than once"
        unknown = [name for name in names if name not in self.accepted and name not in self.reserved]
        if unknown:
            listed = ", ".join(quote(name) for name in unknown)
            return {}, (
                f"unknown request parameter{'s' if len(unknown) > 1 else ''} {listed}; "
                f"accepted: {', '.join(self.accepted)} (and Triton's reserved {', '.join(self.reserved)})"
            )
        return {name: value for name, value in pairs if name in self.accepted}, None

    def images(self, count):
        """None, or why a request of `count` images is refused."""
        if count > self.max_images:
            return f"a request holds at most {self.max_images} images, this one {count}"
        return None
