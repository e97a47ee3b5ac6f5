"""The engine-core process side: the core builder (a single ModelRunner or the tensor-parallel
executor), the core's loop behind its pipes and their messages, and the tensor-parallel executor with
its worker processes and step wire."""
