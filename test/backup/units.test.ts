/** Counts and sizes as the commands print them for people. */
import { expect, test } from 'vitest';
import { counted, formatBytes } from '../../src/backup/units.js';

test('a count takes the singular noun for exactly one, the plural otherwise (also for zero)', () => {
  expect(counted(1, 'chunk')).toBe('1 chunk');
  expect(counted(0, 'chunk')).toBe('0 chunks');
  expect(counted(468, 'extent')).toBe('468 extents');
  expect(counted(2, 'damaged manifest')).toBe('2 damaged manifests');
  expect(counted(3, 'entry', 'entries')).toBe('3 entries');
});

test('byte counts use binary units with three significant digits', () => {
  expect(formatBytes(0)).toBe('0 B');
  expect(formatBytes(1023)).toBe('1023 B');
  expect(formatBytes(1992294)).toBe('1.90 MiB');
  expect(formatBytes(64 * 1024 * 1024)).toBe('64.0 MiB');
  expect(formatBytes(200 * 1024 ** 3)).toBe('200 GiB');
});
