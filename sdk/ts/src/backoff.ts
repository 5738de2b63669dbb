/**
 * Reconnect delays: exponential backoff with full jitter (AWS architecture blog,
 * "Exponential Backoff and Jitter"), so a fleet of clients that lost the same
 * server does not come back in lockstep.
 */
export interface BackoffOptions {
  /** Upper bound of the first delay, in ms. */
  initialDelayMs: number;
  /** Upper bound no delay exceeds, in ms. */
  maxDelayMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { initialDelayMs: 250, maxDelayMs: 30_000 };

export class Backoff {
  private attempt = 0;

  constructor(
    private readonly options: BackoffOptions = DEFAULT_BACKOFF,
    private readonly random: () => number = Math.random,
  ) {}

  /** The delay before the next attempt: uniform in [0, min(max, initial * 2^attempt)]. */
  next(): number {
    const ceiling = Math.min(this.options.maxDelayMs, this.options.initialDelayMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    return Math.floor(this.random() * ceiling);
  }

  /** A connection succeeded: the next failure starts from the initial delay. */
  reset(): void {
    this.attempt = 0;
  }
}
