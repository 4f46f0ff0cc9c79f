"""Everyday sentences generated from templates: commands, times, dates, numbers, names, small talk.

The dictionary text we extract is full of rare words; captions and voice commands are not. These
templates put the words people say most (numbers, days, months, names, household things) into the
corpus. Slots in braces are filled at random; `everyday_sentences` is deterministic given its seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

from .text import digits_to_words, number_to_words, ordinal_to_words, time_to_words, year_to_words


def _phrases(text: str) -> list[str]:
    """Comma-separated phrases, newlines ignored."""
    return [p.strip() for p in text.replace("\n", " ").split(",")]


DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()
NAMES = """
james mary john patricia robert jennifer michael linda william elizabeth david barbara richard susan joseph
jessica thomas sarah charles karen chris nancy daniel lisa matthew betty anthony margaret mark sandra paul
ashley steven kimberly andrew emily kenneth donna joshua michelle kevin carol brian amanda george melissa
edward deborah ronald stephanie timothy rebecca jason laura jeffrey sharon ryan cynthia jacob kathleen gary
amy nicholas shirley eric angela jonathan helen stephen anna larry brenda justin pamela scott nicole frank
emma brandon samantha benjamin katherine gregory christine samuel rachel raymond catherine patrick maria
alexander heather jack diane dennis ruth jerry julie tyler olivia aaron joyce jose virginia henry victoria
adam kelly douglas lauren nathan christina peter joan zachary evelyn kyle judith walter megan harold cheryl
jeremy andrea ethan hannah carl martha keith jacqueline roger frances noah gloria gerald ann christian teresa
terry kathryn sean sara arthur janice austin jean lucas alice oliver sophie mohammed fatima priya raj wei
mei hiroshi yuki carlos sofia juan lucia ahmed aisha omar leila ivan olga pierre claire hans greta liam chloe
""".split()
SURNAMES = """
smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez wilson anderson
thomas taylor moore jackson martin lee thompson white harris clark lewis robinson walker young allen king
wright scott green baker adams nelson hill campbell mitchell roberts carter phillips evans turner parker
collins edwards stewart morris murphy cook rogers morgan cooper peterson reed bailey kelly howard cox ward
""".split()
CITIES = """
london paris berlin madrid rome dublin edinburgh glasgow manchester liverpool boston chicago seattle denver
atlanta dallas houston phoenix miami toronto vancouver montreal sydney melbourne auckland tokyo beijing
delhi mumbai cairo lagos nairobi lisbon vienna prague warsaw oslo stockholm helsinki amsterdam brussels
zurich geneva athens istanbul moscow portland austin nashville detroit philadelphia
""".split()
ROOMS = _phrases("""
kitchen, living room, bedroom, bathroom, hallway, office, garage, garden, dining room, basement,
attic, porch, kids' room, guest room
""")
DEVICES = _phrases("""
lights, lamp, heating, air conditioning, fan, radio, television, music, oven, kettle, coffee
machine, dishwasher, washing machine, heater, alarm, speaker, computer, printer, sprinklers, porch
light, ceiling light
""")
FOODS = _phrases("""
milk, bread, eggs, butter, cheese, apples, bananas, oranges, tomatoes, potatoes, onions, carrots,
rice, pasta, coffee, tea, sugar, flour, chicken, fish, beans, yogurt, cereal, lettuce, garlic,
lemons, grapes, strawberries, chocolate, cookies, juice, water, salt, pepper, honey, jam, mushrooms,
noodles, peanut butter, olive oil, orange juice, ice cream, tomato sauce, paper towels
""")
THINGS = """
keys phone wallet glasses umbrella coat jacket shoes bag book laptop charger ticket passport letter
package car bike dog cat kids baby presents tickets notebook pen headphones
""".split()
PLACES = _phrases("""
the station, the airport, the office, the shop, the supermarket, the park, the school, the library,
the hospital, the bank, the post office, the gym, the beach, the cinema, home, work, the restaurant,
the pharmacy, the hotel, church, town, the market, grandma's house, the dentist, the garage, the
swimming pool, the zoo, the museum
""")
ARTISTS = _phrases("""
the beatles, mozart, beethoven, bach, taylor swift, adele, queen, abba, miles davis, bob marley,
elvis, the rolling stones, nina simone, frank sinatra, ella fitzgerald
""")
GENRES = _phrases("""
jazz, rock, classical music, pop, blues, country, folk, reggae, hip hop, soul, piano music, relaxing
music, something cheerful, the top forty
""")
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "warm white", "cool white"]
WEATHER = "rain snow wind fog thunder storm frost heat".split()  # nouns
WEATHER_VERBS = "rain snow hail freeze drizzle".split()
FEELINGS = "tired happy hungry busy cold worried excited sorry late ready bored sick fine great".split()
ACTIONS = ["call", "text", "email", "message", "remind", "ask", "tell", "meet", "phone", "visit"]
UNITS = ["minutes", "seconds", "hours"]

Slot = Callable[[random.Random], str]


def _pick(items: list[str]) -> Slot:
    return lambda rng: rng.choice(items)


def _number(low: int, high: int) -> Slot:
    return lambda rng: number_to_words(rng.randint(low, high))


def _clock(rng: random.Random) -> str:
    hour, minute = rng.randint(1, 12), rng.choice([0, 0, 5, 10, 15, 20, 25, 30, 30, 35, 40, 45, 50, 55])
    style = rng.random()
    if minute == 15 and style < 0.5:
        return "quarter past " + number_to_words(hour)
    if minute == 30 and style < 0.5:
        return "half past " + number_to_words(hour)
    if minute == 45 and style < 0.5:
        return "quarter to " + number_to_words(hour % 12 + 1)
    if minute and style < 0.2:
        return f"{number_to_words(minute)} past {number_to_words(hour)}"
    return time_to_words(hour, minute)


def _date(rng: random.Random) -> str:
    day, month = rng.randint(1, 31), rng.choice(MONTHS)
    style = rng.random()
    if style < 0.4:
        return f"the {ordinal_to_words(day)} of {month}"
    if style < 0.8:
        return f"{month} {ordinal_to_words(day)}"
    return f"{month} {ordinal_to_words(day)} {year_to_words(rng.randint(1950, 2035))}"


def _price(rng: random.Random) -> str:
    whole, cents = rng.randint(1, 500), rng.choice([0, 0, 50, 99, 25, rng.randint(1, 99)])
    words = number_to_words(whole) + (" dollar" if whole == 1 else " dollars")
    return words + (f" and {number_to_words(cents)} cents" if cents else "")


def _phone(rng: random.Random) -> str:
    return digits_to_words("".join(str(rng.randint(0, 9)) for _ in range(rng.choice([7, 10, 11]))))


def _big_number(rng: random.Random) -> str:
    return number_to_words(rng.choice([rng.randint(100, 999), rng.randint(1000, 99999), rng.randint(10**5, 10**7)]))


def _full_name(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"


SLOTS: dict[str, Slot] = {
    "name": _pick(NAMES),
    "name2": _pick(NAMES),
    "fullname": _full_name,
    "city": _pick(CITIES),
    "room": _pick(ROOMS),
    "device": _pick(DEVICES),
    "food": _pick(FOODS),
    "food2": _pick(FOODS),
    "thing": _pick(THINGS),
    "place": _pick(PLACES),
    "artist": _pick(ARTISTS),
    "genre": _pick(GENRES),
    "colour": _pick(COLOURS),
    "weather": _pick(WEATHER),
    "weather_verb": _pick(WEATHER_VERBS),
    "feeling": _pick(FEELINGS),
    "action": _pick(ACTIONS),
    "day": _pick(DAYS),
    "month": _pick(MONTHS),
    "unit": _pick(UNITS),
    "clock": _clock,
    "date": _date,
    "price": _price,
    "phone": _phone,
    "big": _big_number,
    "n": _number(2, 12),
    "n60": _number(2, 60),
    "pct": _number(5, 100),
    "temp": _number(15, 30),
    "year": lambda rng: year_to_words(rng.randint(1900, 2035)),
    "nth": lambda rng: ordinal_to_words(rng.randint(1, 31)),
    "count": _number(2, 99),
}

TEMPLATES = """
turn on the {room} {device}|turn off the {device} in the {room}|switch off the {device}
switch on the {device}|please turn the {device} off|can you turn on the {device}
dim the {room} lights to {pct} percent|set the {room} lights to {colour}
set the heating to {temp} degrees|turn the temperature up by {n} degrees|turn the volume down
turn it up a little|make it a bit louder please|lock the front door|is the back door locked
open the {room} blinds|close the curtains in the {room}|start the {device} at {clock}|stop the {device}
set a timer for {n60} {unit}|set a timer for {n} minutes and {n60} seconds
how much time is left on the timer|cancel the timer|set an alarm for {clock}
wake me up at {clock} tomorrow|set an alarm for {clock} on {day}|snooze the alarm for {n} minutes
remind me to buy {food} at {clock}|remind me to call {name} on {day}
remind me to take the {thing} when i leave|add {food} to the shopping list
add {food} and {food2} to my list|what's on my shopping list|we need more {food}
did you remember to buy {food}|i'll pick up some {food} on the way|what's the weather like today
will it {weather_verb} tomorrow|is it going to {weather_verb} on {day}|what's the temperature outside
how cold is it in {city}|what's the forecast for {city} this weekend|do i need an umbrella today
what time is it|what's the date today|what day is it on {date}|what time is it in {city}
how long does it take to get to {place}|how far is {city} from {city}|call {name}|call {fullname}
call {name} on speaker|text {name} that i'm running {n} minutes late
send a message to {name} saying i'll be home at {clock}|{action} {name} about the meeting on {day}
read my new messages|do i have any missed calls|what's {name}'s phone number|her number is {phone}
my phone number is {phone}|you can reach me on {phone}|the code is {phone}|play some {genre}
play {genre} in the {room}|play the next song|skip this song|pause the music|play something by {artist}
who sings this song|put on the radio|play the news|what's on my calendar for {day}
schedule a meeting with {name} on {day} at {clock}|move my {clock} meeting to {day}
i have a doctor's appointment on {date}|the meeting is on {date} at {clock}|my birthday is on {date}
{name}'s birthday is {date}|we're flying to {city} on {date}|the train leaves at {clock}
the bus comes at {clock}|i'll meet you at {place} at {clock}|let's meet at {clock} on {day}
can we move it to {day} afternoon|how about {day} morning instead|dinner is at {clock}|it costs {price}
that will be {price} please|i paid {price} for it|the total comes to {price}|it's {count} percent off
there are {count} people in the room|we need {n} chairs|i counted {big}|the population is about {big}
it was built in {year}|she was born in {year}|he moved to {city} in {year}|it happened on the {nth}
it's on the {nth} floor|take the {nth} exit|page {count} please|add {count} and {count}
what's {count} times {n}|what is {count} divided by {n}|convert {count} miles to kilometres
count from one to {n}|{count} plus {count} equals what|how many days until {date}|hi {name} how are you
good morning {name}|good night everyone|thanks {name} see you on {day}|nice to meet you i'm {name}
this is {fullname} speaking|could you spell that please|sorry i didn't catch that
could you say that again please|i'm a bit {feeling} today|i'm {feeling} because of the {weather}
how was your weekend|what did you do on {day}|we went to {place} on {day}|i'm going to {place}
i'm on my way to {place}|i'll be there in {n60} minutes|i'm at {place} now|where did i leave my {thing}
have you seen my {thing}|don't forget your {thing}|i left my {thing} at {place}
can you pick up the {thing}|the {thing} is on the table in the {room}|what's for dinner tonight
let's have {food} for lunch|how do i make {food} pancakes|how long do i boil {food}
preheat the oven to {count} degrees|cook it for {n60} minutes|the kids are at {place}
{name} is picking up the kids at {clock}|{name} and {name2} are coming for dinner on {day}
tell {name} dinner is ready|ask {name} if she wants tea|is {name} home yet|where is {name}
when does {name} get back from {city}|{name} called while you were out|navigate to {place}|take me home
how's the traffic to {place}|find a restaurant near {place}|what time does {place} open
is {place} open on {day}|book a table for {n} at {clock}|order a taxi to {place}
the flight to {city} is delayed by {n60} minutes|gate {count} is now boarding|platform {n} please
yes please|no thank you|okay sounds good|that's right|not right now|maybe later|stop|cancel that
never mind|go back|what can you do|help me with something|repeat that|louder please|say it slowly
it's been raining all day in {city}|the {weather} should clear by {day}|it was {temp} degrees yesterday
i'll call you back in {n} minutes|can you hear me now|the line is breaking up|let me check my calendar
""".replace("\n", "|").split("|")
TEMPLATES = [t.strip() for t in TEMPLATES if t.strip()]


def fill(template: str, rng: random.Random) -> str:
    """Fill every ``{slot}`` of one template."""
    return re.sub(r"\{(\w+)\}", lambda m: SLOTS[m[1]](rng), template)


def everyday_sentences(seed: int) -> Iterator[str]:
    """Endless everyday sentences, deterministic given the seed (duplicates possible; dedupe downstream).

    About one in four joins two short sentences with "and" or "then", so lengths spread out.
    """
    rng = random.Random(seed)
    while True:
        sentence = fill(rng.choice(TEMPLATES), rng)
        if rng.random() < 0.25:
            sentence += rng.choice([" and ", " then ", " and then ", " "]) + fill(rng.choice(TEMPLATES), rng)
        yield sentence
