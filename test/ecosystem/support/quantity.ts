import { quantityBytes } from '../../../src/client/kubernetes-transport.js';

/** A Kubernetes quantity as bytes, by the client's own parser; a form it cannot read fails the test. */
export function parseQuantity(q: string): number {
  const bytes = quantityBytes(q);
  if (bytes === null) throw new Error(`not a whole-number byte quantity: ${q}`);
  return bytes;
}
