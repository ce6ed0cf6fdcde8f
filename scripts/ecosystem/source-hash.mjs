#!/usr/bin/env node
// SHA-256 of a source directory (every file's relative path and bytes, in path order): what build.sh
// records for a program built from this repository, and what test/ecosystem/tools.ts compares with, so
// a binary built from older sources is not taken for the current one.
// Usage: node scripts/ecosystem/source-hash.mjs DIR
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = process.argv[2];
if (!root) {
  console.error('usage: source-hash.mjs DIR');
  process.exit(2);
}
const files = [];
const walk = (dir) => {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, entry.name);
    if (entry.isDirectory()) walk(p);
    else if (entry.isFile()) files.push(p);
  }
};
walk(root);
const hash = createHash('sha256');
for (const file of files.map((f) => relative(root, f)).sort()) {
  const data = readFileSync(join(root, file));
  hash.update(`${file}\0${data.length}\0`);
  hash.update(data);
}
console.log(hash.digest('hex'));
