// Unit tests of the pure parts: reconnect backoff and duplicate detection.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Backoff, Seen } from "../../src/index.js";

test("backoff ceilings double up to the maximum, with full jitter, and reset", () => {
  const highest = new Backoff({ initialDelayMs: 100, maxDelayMs: 1000 }, () => 0.999999);
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => highest.next()), [99, 199, 399, 799, 999, 999]);
  highest.reset();
  assert.equal(highest.next(), 99);
  const lowest = new Backoff({ initialDelayMs: 100, maxDelayMs: 1000 }, () => 0);
  assert.equal(lowest.next(), 0, "full jitter may retry at once");
});

test("seen drops duplicates and keeps a contiguous watermark", () => {
  const seen = new Seen();
  assert.equal(seen.add("d:1:2", 1n), true);
  assert.equal(seen.add("d:1:2", 3n), true, "an own send's ack may come first");
  assert.equal(seen.watermark("d:1:2"), 1n, "2 is still missing");
  assert.equal(seen.add("d:1:2", 2n), true);
  assert.equal(seen.watermark("d:1:2"), 3n);
  assert.equal(seen.add("d:1:2", 3n), false);
  assert.equal(seen.add("d:1:2", 1n), false);
  assert.deepEqual(seen.cursors(), [{ conversationId: "d:1:2", seq: 3n }]);
});

test("a pushed message can start a conversation; an own ack cannot", () => {
  const seen = new Seen();
  assert.equal(seen.add("g:9", 40n, true), true, "added to a group at seq 40");
  assert.equal(seen.watermark("g:9"), 40n);
  assert.equal(seen.add("d:1:5", 2n), true);
  assert.equal(seen.watermark("d:1:5"), 0n, "seq 1 may still be on its way");
  assert.equal(seen.add("d:1:5", 1n, true), true);
  assert.equal(seen.watermark("d:1:5"), 2n);
});

test("advanceTo skips history a fresh device does not want", () => {
  const seen = new Seen();
  seen.add("g:1", 12n, true);
  seen.advanceTo("g:1", 10n);
  assert.equal(seen.watermark("g:1"), 12n);
  seen.advanceTo("g:2", 7n);
  assert.equal(seen.add("g:2", 7n), false);
  assert.equal(seen.add("g:2", 8n), true);
});
