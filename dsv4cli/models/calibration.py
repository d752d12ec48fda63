"""The built-in calibration text for `dsv4 imatrix`: prose, dialogue, code, mathematics, tables and several
languages, so that the router sends tokens to experts of every kind. It is not the evaluation text of `dsv4 eval`
(a quant measured on its own calibration text would look better than it is)."""

from __future__ import annotations

TEXT = """\
The river had been rising for three days before anyone in the valley thought to move the grain. By the time the
miller's daughter ran up the hill road with the news, water stood a hand deep in the lower barns, and the old men
who had sworn it would never reach the square were already carrying sacks up the church steps.

"Why didn't you say so yesterday?" asked the baker, out of breath.
"I did," she said. "You told me the river was older than I was and knew its manners."

In 1854 John Snow mapped the deaths from cholera around Broad Street in London and noticed that they clustered
around a single public pump. He persuaded the parish to remove its handle; the outbreak, already waning, ended.
The map is remembered less for what it proved than for how it argued: a picture that made a hypothesis visible.

def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists in linear time.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

#include <stdio.h>
int main(void) {
    for (int i = 1; i <= 15; ++i)
        printf(i % 15 == 0 ? "FizzBuzz\\n" : i % 3 == 0 ? "Fizz\\n" : i % 5 == 0 ? "Buzz\\n" : "%d\\n", i);
    return 0;
}

SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2024-01-01'
GROUP BY customer_id HAVING SUM(amount) > 1000 ORDER BY total DESC LIMIT 10;

Theorem. For every prime p and integer a not divisible by p, a^(p-1) ≡ 1 (mod p).
Proof sketch. The numbers a, 2a, ..., (p-1)a are distinct and nonzero modulo p, so they are a permutation of
1, 2, ..., p-1. Multiplying them gives a^(p-1) (p-1)! ≡ (p-1)! (mod p), and (p-1)! is invertible modulo p. ∎

The integral of e^(-x^2) over the real line equals √π; squaring it and passing to polar coordinates turns the
product of two Gaussian integrals into ∫∫ e^(-r^2) r dr dθ = π. The derivative of sin(x)/x at zero is 0.

| Metal    | Density (g/cm³) | Melting point (°C) |
|----------|-----------------|--------------------|
| Aluminum | 2.70            | 660                |
| Copper   | 8.96            | 1085               |
| Tungsten | 19.25           | 3422               |

Le marché ouvre à sept heures, mais les meilleurs fromages partent avant huit. Die Bahn hatte wieder Verspätung,
also gingen wir zu Fuß über die Brücke. El viento del norte trajo lluvia durante toda la semana.
今天的天气很好，我们去公园散步吧。机器学习模型需要大量的数据来训练。東京の朝は静かで、電車だけが時間通りに動いている。
Сегодня мы обсуждаем, как работают большие языковые модели и почему им нужно столько памяти.

User: My sourdough starter smells like acetone. Is it dead?
Assistant: Probably not. An acetone smell usually means it is hungry: the yeast and bacteria have run out of
food. Discard most of it and feed it twice a day at a warmer temperature; it should recover within a few days.

Q: A train leaves at 14:05 and arrives at 17:50. How long is the journey?
A: From 14:05 to 17:05 is 3 hours; from 17:05 to 17:50 is 45 minutes; so 3 hours 45 minutes.

{"id": 42, "name": "sensor-7", "readings": [21.4, 21.9, 22.3], "status": "ok", "tags": ["lab", "north"]}

Photosynthesis converts light energy into chemical energy: carbon dioxide and water become glucose and oxygen
inside the chloroplasts. Mitochondria run the reverse, releasing the stored energy as ATP for the cell's work.
The court held that the contract was void for lack of consideration, and the appeal was dismissed with costs.
Interest compounds: 1000 at 5 % a year becomes 1000 × 1.05^10 ≈ 1628.89 after ten years.
"""
