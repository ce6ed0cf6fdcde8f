#!/usr/bin/env node
// Fails when src/gen is not exactly what `npm run generate` would produce from proto/,
// so a .proto edit without regeneration (or a hand edit of generated code) cannot land.
// Usage: node scripts/check-generated.mjs   (run from the repository root)
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(fileURLToPath(new URL('..', import.meta.url)));
const generatedDir = 'src/gen';
const buf = join(root, 'node_modules', '.bin', 'buf');

/** Relative paths of all files under dir, sorted; empty when dir is absent. */
function listFiles(dir) {
  if (!existsSync(dir)) return [];
  const out = [];
  const walk = (d) => {
    for (const entry of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, entry.name);
      if (entry.isDirectory()) walk(p);
      else out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.sort();
}

const scratch = mkdtempSync(join(tmpdir(), 'cbt-csi-gen-'));
let exitCode = 0;
try {
  // -o prefixes the template's out dirs, so fresh code lands in <scratch>/src/gen.
  const gen = spawnSync(buf, ['generate', '--output', scratch], { cwd: root, stdio: 'inherit' });
  if (gen.status !== 0) {
    console.error(`check:generated: buf generate failed (exit ${gen.status ?? gen.signal})`);
    exitCode = 2;
  } else {
    const fresh = join(scratch, generatedDir);
    const committed = join(root, generatedDir);
    const freshFiles = listFiles(fresh);
    const committedFiles = listFiles(committed);
    const problems = [];
    for (const f of freshFiles) {
      if (!committedFiles.includes(f)) problems.push(`missing:  ${generatedDir}/${f}`);
      else if (!readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f))))
        problems.push(`differs:  ${generatedDir}/${f}`);
    }
    for (const f of committedFiles) {
      if (!freshFiles.includes(f)) problems.push(`stale:    ${generatedDir}/${f} (no longer generated)`);
    }
    if (problems.length > 0) {
      console.error(`check:generated: ${generatedDir} is out of date with proto/:`);
      for (const p of problems) console.error(`  ${p}`);
      console.error('Run `npm run generate` and commit the result.');
      exitCode = 1;
    } else {
      console.log(`check:generated: ${generatedDir} is up to date (${freshFiles.length} files).`);
    }
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
process.exit(exitCode);
