#!/usr/bin/env python3
"""Make a script-runner copy of Debian's Scratch.image (Squeak 2.8-era, format 6502).

The stock image resumes inside ScratchFrameMorph>>startup, which opens the Scratch UI
and only looks at *.sb / *.sprite arguments (SystemDictionary>>readDocumentFile was
emptied by Scratch), so a .st script given on the command line is ignored.

This rewrites the first 7 bytecodes of ScratchFrameMorph>>startup, which were
    HostSystemMenus startUp. HostSystemMenus menuBarControler reviseHostMenus.
(Mac-only menu set-up) into
    (FileStream oldFileNamed: (Smalltalk getSystemAttribute: 2)) fileIn.
reusing four literal slots of that method (they are used nowhere else in it).
So `squeakvm -vm-display-null -vm-sound-null runner.image /abs/path/script.st`
files in script.st (chunk format) before the Scratch UI is built; a script that
ends with `Smalltalk quitPrimitive` never shows Scratch at all.

usage: patch_image.py IN.image OUT.image

Adapted from the reference kit; used by run.py (which caches the result).
"""
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sqimage import Image, find_symbol, find_global_assoc  # noqa: E402

OLD_CODE = bytes([65, 208, 135, 65, 211, 210, 135])
# pushLitVar lit1; pushLitVar lit19 (Smalltalk); push 2; send lit3 (1 arg);
# send lit2 (1 arg); send lit0 (0 args); pop
NEW_CODE = bytes([65, 64 + 19, 119, 224 + 3, 224 + 2, 208 + 0, 135])


def patch(src, dst):
    """Write a patched copy of the image at src to dst (refuses any other image)."""
    img = Image(src)
    buf = bytearray(img.raw)
    C = img.classes()
    m = img.method_dict(C['ScratchFrameMorph'])['startup']
    md = img.method(m)
    lits = [img.lit_repr(x) for x in md['lits']]
    assert lits[:4] == ['#startUp', 'HostSystemMenus', '#reviseHostMenus', '#menuBarControler'], lits[:4]
    assert lits[19] == 'Smalltalk', lits[19]
    assert md['code'][:7] == OLD_CODE, md['code'][:7]
    new_lits = {
        0: find_symbol(img, 'fileIn'),
        1: find_global_assoc(img, 'FileStream'),
        2: find_symbol(img, 'oldFileNamed:'),
        3: find_symbol(img, 'getSystemAttribute:'),
    }
    assert all(new_lits.values()), new_lits
    moff = img.hdr + img.off(m)      # file offset of the base header
    for i, oop in new_lits.items():
        struct.pack_into('<I', buf, moff + 8 + 4 * i, oop)
    code_off = moff + 8 + 4 * md['nlit']
    assert bytes(buf[code_off:code_off + 7]) == OLD_CODE
    buf[code_off:code_off + 7] = NEW_CODE
    with open(dst, 'wb') as f:
        f.write(bytes(buf))
    return code_off


def main(argv):
    code_off = patch(argv[1], argv[2])
    print('patched ScratchFrameMorph>>startup at file offset %d -> %s' % (code_off, argv[2]))


if __name__ == '__main__':
    main(sys.argv)
