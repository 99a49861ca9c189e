"""A `cvc5` command for SMT-LIB 2 sessions on stdin, built on the cvc5 Python bindings.

PyPI's `cvc5` wheel ships libcvc5 (1.4.x) with Python bindings but no `cvc5` executable.
`scripts/install-cvc5.sh` installs the wheel in a virtualenv and this file as its `bin/cvc5`,
so programs that drive the cvc5 binary interactively (`cvc5 --lang smt`, commands on stdin,
answers on stdout, as `cedar-policy-symcc` does) work unchanged:

- each top-level command is run as soon as it is complete, and its output (`sat`,
  `unsat`, a model, …) is written and flushed at once; commands that print nothing unless
  they fail (`declare-…`, `assert`, …) wait for the next one that answers and are parsed
  with it;
- `(reset)` starts a fresh solver with the command-line options applied again;
- a command that does not parse or type-check prints `(error "Parse Error: …")` and ends
  the process with status 1, as the cvc5 binary does; other errors print `(error "…")`;
- `--version` prints `This is cvc5 version X.Y.Z`; `--lang smt` is accepted;
  any other `--name=value` (or `--name`, meaning `true`) is passed to the solver as an option,
  e.g. `--tlimit-per=60000`.
"""

import sys

import cvc5

LANGS = ("smt", "smt2", "smt2.6", "smtlib2.6", "smt-lib-2.6")


def version():
    raw = cvc5.Solver(cvc5.TermManager()).getVersion()
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return text.split("-")[0]


def parse_args(argv):
    options = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--version":
            print("This is cvc5 version %s (Python bindings, meshgate shim)" % version())
            sys.exit(0)
        if arg == "--lang" and args:
            lang = args.pop(0)
        elif arg.startswith("--lang="):
            lang = arg.split("=", 1)[1]
        elif arg.startswith("--") and len(arg) > 2:
            name, _, value = arg[2:].partition("=")
            options.append((name, value if value else "true"))
            continue
        else:
            fail_usage("unsupported argument `%s` (only SMT-LIB on stdin)" % arg)
        if lang not in LANGS:
            fail_usage("unsupported input language `%s`" % lang)
    return options


def fail_usage(message):
    sys.stderr.write("cvc5 (meshgate shim): %s\n" % message)
    sys.exit(2)


def quote(message):
    return '"%s"' % message.replace('"', '""')


class Session:
    """One solver with its symbol table, rebuilt on `(reset)`."""

    def __init__(self, options):
        self.options = options
        self.reset()

    def reset(self):
        self.tm = cvc5.TermManager()
        self.solver = cvc5.Solver(self.tm)
        for name, value in self.options:
            self.solver.setOption(name, value)
        self.symbols = cvc5.SymbolManager(self.tm)

    def run(self, command_text):
        """Runs one complete top-level command; returns an exit status when the session ends."""
        if command_text.strip() == "(reset)":
            self.reset()
            return None
        parser = cvc5.InputParser(self.solver, self.symbols)
        parser.setStringInput(cvc5.InputLanguage.SMT_LIB_2_6, command_text, "<stdin>")
        while True:
            try:
                command = parser.nextCommand()
            except RuntimeError as e:
                emit("(error %s)\n" % quote("Parse Error: %s" % e))
                return 1
            if command.isNull():
                return None
            if command.getCommandName() == "exit":
                return 0
            try:
                out = command.invoke(self.solver, self.symbols)
                # The bindings add the reason (`unknown (TIMEOUT)`); the binary does not.
                if command.getCommandName() == "check-sat" and out.startswith("unknown"):
                    out = "unknown\n"
                emit(out)
            except RuntimeError as e:
                emit("(error %s)\n" % quote(str(e)))


def emit(text):
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def commands(stream):
    """Yields each complete top-level s-expression of the input as soon as it is read."""
    buf = []
    depth = 0
    in_string = in_symbol = False
    while True:
        line = stream.readline()
        if not line:
            return
        for ch in line:
            if in_string:
                buf.append(ch)
                if ch == '"':
                    in_string = False  # `""` inside a string re-enters on the next quote
                continue
            if in_symbol:
                buf.append(ch)
                if ch == "|":
                    in_symbol = False
                continue
            if ch == ";":
                break  # a comment runs to the end of the line
            if depth == 0 and ch.isspace():
                continue
            buf.append(ch)
            if ch == '"':
                in_string = True
            elif ch == "|":
                in_symbol = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth <= 0:
                    yield "".join(buf)
                    buf = []
                    depth = 0
        if buf and depth > 0:
            buf.append("\n")


# Commands that print nothing unless they fail: they are parsed together with the next
# command that answers (a parser per command costs more than solving SymCC's queries).
SILENT = ("(set-option", "(set-logic", "(declare-", "(define-", "(assert", "(push", "(pop")


def main():
    session = Session(parse_args(sys.argv[1:]))
    pending = []
    for text in commands(sys.stdin):
        if text.startswith(SILENT):
            pending.append(text)
            continue
        if pending and text.strip() != "(reset)":
            pending.append(text)
            text = "\n".join(pending)
        elif pending:
            status = session.run("\n".join(pending))
            if status is not None:
                sys.exit(status)
        pending = []
        status = session.run(text)
        if status is not None:
            sys.exit(status)
    if pending:
        status = session.run("\n".join(pending))
        if status is not None:
            sys.exit(status)
    sys.exit(0)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        fail_usage(str(e))
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(1)
