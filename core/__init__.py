"""Models, weight loading, the server runtime and the client. Imports transport and quant, never cli."""
