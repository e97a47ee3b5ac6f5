"""A small built-in training corpus (English, code, many scripts) for the offline demo tokenizer."""

from __future__ import annotations

from collections.abc import Iterator

# Written for this project. Variety matters more than volume: the merges should cover common English
# words, code punctuation and indentation, and a few frequent pieces of non-Latin scripts, so the demo
# tokenizer behaves like a real byte-level BPE (multi-byte characters split across tokens included).
ENGLISH = """
The server keeps a queue of waiting requests and a set of running ones. Every step it picks the
requests that fit in the token budget, runs the model once over all of them, and samples one new token
for each sequence that reached the end of its prompt. When memory runs out, the newest request is
preempted and recomputed later. This is what people call continuous batching.
A paged key-value cache splits memory into fixed-size blocks. Each sequence owns a table of block
numbers, so its cache does not need to be contiguous. Two requests that share a prompt can share the
blocks that hold it, which saves both memory and time.
The weather today is mild, with a light breeze from the west and a few clouds in the afternoon. In the
evening the temperature will drop, and there may be some rain during the night. Tomorrow should be
brighter, warmer and calmer than today.
She opened the window, looked at the garden and decided that the roses needed water before lunch. Her
brother was still reading the newspaper in the kitchen, where the kettle had just started to whistle.
They talked about the trip they were planning for the summer: a week by the sea, then a few days in
the mountains, walking from one village to the next.
To bake simple bread, mix flour, water, salt and a little yeast. Knead the dough for ten minutes,
let it rise for an hour, shape it, and bake it in a hot oven until the crust is golden and the loaf
sounds hollow when you tap the bottom.
Questions and answers: What is a token? A token is a piece of text that the model reads as one unit.
Why do we measure throughput? Because the number of tokens produced per second tells us how many users
one machine can serve. What is latency? It is the time a user waits, for example until the first token
arrives, or between two tokens of a streamed answer.
Numbers appear everywhere: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 128, 256, 512, 1024, 2048,
3.14159, 2.71828, 1e-6, 100%, $19.99, 12:30, 2024-05-17, version 1.2.3, room 404, page 17 of 230.
Please summarize the following document in three sentences. Translate this paragraph into French.
Write a short poem about the ocean. Explain the difference between a list and a tuple in Python.
You are a helpful assistant. Answer briefly and accurately. If you do not know, say so.
I think that this is a good idea, but we should test it first. Could you send me the results when the
benchmark is finished? Thank you very much for your help, and have a nice weekend!
"""

CODE = '''
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.free_blocks = list(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("out of blocks")
        block_id = self.free_blocks.pop()
        self.ref_counts[block_id] = 1
        return block_id


for index, item in enumerate(items):
    if item is None:
        continue
    print(f"{index}: {item!r}")

import json
import os
from pathlib import Path

config = json.loads(Path("config.json").read_text())
result = {"name": "demo", "layers": 4, "hidden_size": 256, "enabled": True, "ratio": 0.5}

function add(a, b) {
  return a + b;
}
const users = await fetch("/api/users").then((response) => response.json());
if (x >= 0 && y <= 10 || !done) { count += 1; } else { count -= 1; }

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%s\\n", argv[i]);
    }
    return 0;
}

SELECT name, COUNT(*) AS total FROM requests WHERE status = 'done' GROUP BY name ORDER BY total DESC;
git commit -m "Fix the scheduler" && git push origin main
pip install -e '.[dev]' && python -m pytest -q
<div class="message"><p>Hello, <b>world</b>!</p></div>
'''

MULTILINGUAL = """
Français : Le serveur reçoit des requêtes et répond rapidement. Nous avons testé le modèle hier soir,
et les résultats étaient très intéressants. Où est la gare ? Ça dépend de l'été et de la mémoire.
Deutsch: Der Server verarbeitet viele Anfragen gleichzeitig. Die Größe des Speichers ist begrenzt,
aber die Ergebnisse sind schön. Über die Brücke gehen wir zur Straße, wo das Café geöffnet ist.
Español: El servidor atiende muchas solicitudes a la vez. ¿Dónde está la biblioteca? Mañana iremos
al mercado para comprar pan, queso y algunas frutas. El niño aprendió una canción nueva.
Português: O servidor responde às perguntas com atenção. Não sei se ele vai chegar amanhã.
Italiano: Il modello genera una parola alla volta. Perché la città è così bella di sera?
Русский: Сервер обрабатывает запросы пользователей. Сегодня хорошая погода, и мы идём гулять в парк.
Модель генерирует текст по одному токену. Спасибо за помощь!
Ελληνικά: Ο διακομιστής απαντά γρήγορα. Καλημέρα σε όλους, τι κάνετε σήμερα;
中文：服务器同时处理很多请求。今天天气很好，我们去公园散步吧。模型每次生成一个词元。谢谢你的帮助！
我们的目标是让推理更快、更省内存。这个问题很有意思，我们明天再讨论。
日本語：サーバーは多くのリクエストを同時に処理します。今日はいい天気ですね。ありがとうございます。
モデルはトークンを一つずつ生成します。東京から大阪まで新幹線で行きました。
한국어: 서버는 많은 요청을 동시에 처리합니다. 오늘 날씨가 정말 좋네요. 감사합니다!
العربية: يعالج الخادم طلبات كثيرة في وقت واحد. شكرا جزيلا على مساعدتك. الطقس جميل اليوم.
עברית: השרת מטפל בבקשות רבות בבת אחת. תודה רבה!
हिन्दी: सर्वर एक साथ कई अनुरोधों को संभालता है। आज मौसम बहुत अच्छा है। धन्यवाद!
ไทย: เซิร์ฟเวอร์ตอบคำถามได้อย่างรวดเร็ว ขอบคุณมาก
Tiếng Việt: Máy chủ xử lý nhiều yêu cầu cùng lúc. Cảm ơn bạn rất nhiều!
Türkçe: Sunucu aynı anda birçok isteği işler. Teşekkür ederim, görüşürüz.
Polski: Serwer obsługuje wiele żądań jednocześnie. Dziękuję bardzo, do zobaczenia.
Emoji: 😀 😂 🙂 👍 🎉 🚀 ❤️ ✅ 🔥 🌍 🍕 🐍 👩‍💻 👨‍👩‍👧 🏳️‍🌈 👍🏽 🇫🇷 🇯🇵 ★ ☀ → ← ≤ ≥ ± × ÷ ∑ π ∞ € £ ¥ ° © ®
Combining marks: é e\u0301 ñ n\u0303 ü u\u0308 å a\u030a ǘ ṩ Å Ω ﬁ ｈｅｌｌｏ
"""


def _generated_lines() -> Iterator[str]:
    """Deterministic filler that teaches the merges for digits, arithmetic and JSON-like text."""
    for a in range(0, 60, 3):
        for b in range(1, 40, 7):
            yield f'{a} + {b} = {a + b}; {a} * {b} = {a * b}; {{"a": {a}, "b": {b}, "ok": true}}'
    for width in (2, 4, 8):
        yield "\n".join(" " * width + f"line_{i} = value[{i}]" for i in range(8))


def corpus_lines() -> Iterator[str]:
    """Every training line, in a fixed order (the trained vocabulary depends on it)."""
    for text in (ENGLISH, CODE, MULTILINGUAL):
        yield from text.strip("\n").split("\n")
    yield from _generated_lines()
