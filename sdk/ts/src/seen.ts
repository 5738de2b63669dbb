/**
 * Which messages a device has, per conversation: a contiguous watermark (every
 * seq up to it was seen) plus the seqs seen above it (own sends acknowledged
 * before the messages between arrived). Pushes of one conversation arrive in seq
 * order, so the set above the watermark stays tiny. The watermarks are the
 * cursors a reconnect resumes from; the set makes replays after a reconnect
 * free of duplicates.
 */
export class Seen {
  private readonly watermarks = new Map<string, bigint>();
  private readonly above = new Map<string, Set<bigint>>();

  /**
   * Records `seq`; false when it was already seen (a duplicate). With
   * `startsHere`, a conversation seen for the first time starts at `seq` (a
   * pushed message: this device was added, or was not around before); an own
   * send's seq does not, since others' earlier messages may still be on the way.
   */
  add(conversationId: string, seq: bigint, startsHere = false): boolean {
    if (startsHere && !this.watermarks.has(conversationId)) {
      this.watermarks.set(conversationId, seq - 1n);
    }
    const watermark = this.watermarks.get(conversationId) ?? 0n;
    const above = this.above.get(conversationId) ?? new Set<bigint>();
    if (seq <= watermark || above.has(seq)) {
      return false;
    }
    above.add(seq);
    let next = watermark;
    while (above.delete(next + 1n)) {
      next += 1n;
    }
    this.watermarks.set(conversationId, next);
    if (above.size > 0) {
      this.above.set(conversationId, above);
    } else {
      this.above.delete(conversationId);
    }
    return true;
  }

  /** Everything up to `seq` is known (e.g. the conversation's head on a fresh device). */
  advanceTo(conversationId: string, seq: bigint): void {
    const watermark = this.watermarks.get(conversationId) ?? 0n;
    if (seq <= watermark) {
      return;
    }
    this.watermarks.set(conversationId, seq);
    const above = this.above.get(conversationId);
    if (above) {
      for (const old of [...above]) {
        if (old <= seq) above.delete(old);
      }
      let next = seq;
      while (above.delete(next + 1n)) next += 1n;
      this.watermarks.set(conversationId, next);
      if (above.size === 0) this.above.delete(conversationId);
    }
  }

  watermark(conversationId: string): bigint {
    return this.watermarks.get(conversationId) ?? 0n;
  }

  /** The cursors to resume from: each conversation's watermark. */
  cursors(): { conversationId: string; seq: bigint }[] {
    return [...this.watermarks].map(([conversationId, seq]) => ({ conversationId, seq }));
  }
}
