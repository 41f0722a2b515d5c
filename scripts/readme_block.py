"""readme_block: the --check / --write command line shared by the scripts whose output lives in a
marked block of README.md (scripts/comm_table.py, scripts/decode_table.py): the block is the text
between a begin and an end marker line, and the test command fails when it is not the text the
script computes."""
import re


def main(argv, name, begin, end, text, usage):
    """No argument: print text. --check FILE: 0 when FILE's block is text, else 1. --write FILE:
    replace FILE's block with text. Returns the exit status."""
    if len(argv) == 1:
        print(text)
        return 0
    if len(argv) != 3 or argv[1] not in ("--check", "--write"):
        print(usage)
        return 2
    path = argv[2]
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    m = re.search(re.escape(begin) + r"\n.*?" + re.escape(end), doc, re.S)
    if not m:
        print("%s: no block markers in %s" % (name, path))
        return 1
    block = begin + "\n" + text + "\n" + end
    if argv[1] == "--write":
        with open(path, "w", encoding="utf-8") as f:
            f.write(doc[:m.start()] + block + doc[m.end():])
        return 0
    if m.group(0) != block:
        print("%s: the block in %s is not the one the code gives; run scripts/%s.py --write %s" % (name, path, name, path))
        return 1
    print("%s: %s holds the block the code gives" % (name, path))
    return 0
