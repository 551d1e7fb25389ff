/**
 * The simulation's world: a clock, a queue of events, and connections between named
 * nodes that keep order per direction (as TCP does), delay messages, and can be cut.
 * Nothing here is dist's: it stands in for the sockets and timers the shells own.
 *
 * @module
 */

import { Rng } from "./rng.ts";

/** An event due at a time; ties run in the order they were scheduled. */
interface Due {
  at: number;
  seq: number;
  run: () => void;
}

/** A min-heap of events by (at, seq). */
class Agenda {
  #items: Due[] = [];

  get size(): number {
    return this.#items.length;
  }

  static #less(a: Due, b: Due): boolean {
    return a.at < b.at || (a.at === b.at && a.seq < b.seq);
  }

  push(d: Due): void {
    const items = this.#items;
    items.push(d);
    let i = items.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!Agenda.#less(items[i], items[p])) break;
      [items[i], items[p]] = [items[p], items[i]];
      i = p;
    }
  }

  pop(): Due | undefined {
    const items = this.#items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < items.length && Agenda.#less(items[l], items[m])) m = l;
        if (r < items.length && Agenda.#less(items[r], items[m])) m = r;
        if (m === i) break;
        [items[i], items[m]] = [items[m], items[i]];
        i = m;
      }
    }
    return top;
  }

  peek(): Due | undefined {
    return this.#items[0];
  }
}

/** A connection between two nodes. Messages sent on it arrive in order, or not at all once it is cut. */
export class Link {
  open = true;
  /** When the last message in each direction arrives: a later one never overtakes it. */
  #lastAt = [0, 0];
  #onClose: (() => void)[] = [];

  constructor(
    readonly world: World,
    readonly id: number,
    readonly a: string,
    readonly b: string,
  ) {}

  /** Sends from `from` (one end): `deliver` runs at the other end after a delay, unless the link is cut first. */
  send(from: string, deliver: () => void): void {
    if (!this.open) return;
    const dir = from === this.a ? 0 : 1;
    const at = Math.max(this.#lastAt[dir], this.world.now + this.world.delay());
    this.#lastAt[dir] = at;
    this.world.at(at, () => {
      if (this.open) deliver();
    });
  }

  /** Runs `f` at both ends' notice that the link is gone (each after its own delay). */
  onClose(f: () => void): void {
    this.#onClose.push(f);
  }

  /** Cuts the link: what is in flight is lost; each end learns it a little later. */
  cut(): void {
    if (!this.open) return;
    this.open = false;
    for (const f of this.#onClose) this.world.after(this.world.delay(), f);
    this.#onClose = [];
  }
}

/** The clock, the event queue and the randomness of one seeded run. */
export class World {
  now = 0;
  #agenda = new Agenda();
  #seq = 0;
  #links = 0;
  /** Events run so far. */
  steps = 0;

  constructor(readonly rng: Rng, readonly delayMsMax = 5) {}

  /** A message's delay in ms (0.1 to delayMsMax). */
  delay(): number {
    return 0.1 + this.rng.float() * this.delayMsMax;
  }

  at(time: number, run: () => void): void {
    this.#agenda.push({ at: Math.max(time, this.now), seq: this.#seq++, run });
  }

  after(ms: number, run: () => void): void {
    this.at(this.now + ms, run);
  }

  link(a: string, b: string): Link {
    return new Link(this, ++this.#links, a, b);
  }

  /** Runs one event; false when none is left or the next is past `until`. */
  step(until = Infinity): boolean {
    const next = this.#agenda.peek();
    if (next === undefined || next.at > until) return false;
    this.#agenda.pop();
    this.now = next.at;
    this.steps++;
    next.run();
    return true;
  }

  get pending(): number {
    return this.#agenda.size;
  }
}
