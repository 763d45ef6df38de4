"""The ``parameters`` scopes of a mergekit config: checked as mergekit reads them, chained by precedence.

    parse_parameters(tr, {"weight": 0.5, "smooth": 1}, ("parameters",))   # smooth: no method takes it
    chain(slice_params, global_params)     # one scope: the slice's conditions before the global ones

``tr`` is the translator (surgery.mergekit.config). A parameter no merge method takes is a
typo to mergekit's eyes too, but mergekit ignores it silently: here it is an error, or with
``--mergekit-lenient`` a warning. A name another method takes is left to the merge operation, which
ignores it with a warning, as mergekit ignores it.
"""

from __future__ import annotations

from surgery.errors import did_you_mean


def parse_parameters(tr, params, path: tuple) -> dict:
    """A scope's parameters, without the names mergekit would ignore (reported through ``tr.unknown``)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise tr.error(path, f"parameters must be a mapping of name -> value (got {params!r})")
    out = {}
    for name, value in params.items():
        if not _taken(tr, name, path + (name,)):
            continue
        conditions = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        kept = []
        for i, cond in enumerate(conditions):
            if isinstance(cond, dict):
                where = path + (name,) + ((i,) if isinstance(value, list) else ())
                if "pattern" in cond:
                    tr.unknown(where + ("pattern",), "unknown key 'pattern' in a {value, filter} condition; did "
                               "you mean 'filter'? (without a filter the condition matches every tensor)")
                cond = tr.check_keys({k: v for k, v in cond.items() if k != "pattern"}, ("value", "filter"),
                                     where, "a {value, filter} condition")
                tr.require(cond, "value", where)
            kept.append(cond)
        out[name] = kept[0] if isinstance(value, dict) else kept if conditions else value
    return out


def _taken(tr, name, path: tuple) -> bool:
    """False for a parameter no merge method takes (reported); True for the method's own and other methods'."""
    valid = [p.name for p in tr.spec.parameters]
    if name in valid:
        return True
    from surgery.merge.specs import all_parameter_names

    if name in all_parameter_names():
        return True
    method = tr.spec.name
    tr.unknown(path, f"unknown parameter {name!r} for merge method {method!r}" + did_you_mean(str(name), valid)
               + f" ({method} takes {'only ' + ', '.join(valid) if valid else 'no parameters'})")
    return False


def chain(first: dict, then: dict) -> dict:
    """Two parameter scopes as one: where both set a key, first's conditions come before then's.

    mergekit tries scopes in order and takes the first whose filters match; a list of
    {value, filter} conditions is tried the same way, so concatenating them is equivalent.
    """
    out = dict(then)
    for key, value in first.items():
        if key in then:
            out[key] = _conditions(value) + _conditions(then[key])
        else:
            out[key] = value
    return out


def _conditions(value) -> list:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return list(value)
    return [{"value": value}]
